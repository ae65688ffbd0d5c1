"""Request in → classify → candidate hosts (filters) → scores → pick. Plain Python, no protocol code."""
