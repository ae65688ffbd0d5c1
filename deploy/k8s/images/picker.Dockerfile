# The picker image (`extproc serve`). Build from the repository root:
#   docker build -f deploy/k8s/images/picker.Dockerfile -t registry.example.com/extproc:0.1.0 .
# Only the picker's own dependencies: no Envoy or Triton binaries (the `runtime` extra is for `extproc up`).
FROM python:3.11-slim AS build
# A C compiler for setup.py's mypyc build of the per-request modules (the runtime image needs none).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY extproc ./extproc
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
# A fixed numeric user, so that runAsNonRoot can verify it (deploy/k8s/base/picker.yaml runs it as 10001).
RUN groupadd --gid 10001 extproc && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin extproc
USER 10001:10001
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
EXPOSE 9000 9090
ENTRYPOINT ["extproc"]
CMD ["serve", "--config", "/etc/extproc/fleet.yaml"]
