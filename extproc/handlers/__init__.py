"""Protocol edge: Envoy's ext_proc gRPC stream in, routing headers out."""
