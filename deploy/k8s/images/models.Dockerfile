# The demo model repository (the repository's triton_models/) as an image; the Triton pods' init container
# copies /models into their model-repository volume. Build from the repository root:
#   docker build -f deploy/k8s/images/models.Dockerfile -t registry.example.com/extproc-models:0.1.0 .
FROM busybox:1.36
# Files keep their mode from the checkout (644, directories 755): readable by the non-root Triton user.
COPY triton_models /models
USER 65534:65534
