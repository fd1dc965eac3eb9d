# litellm's proxy image with the provider-budgets plugin; from the repository root:
#   docker build -f deploy/k8s/litellm.Dockerfile -t litellm-budgets .
ARG LITELLM_IMAGE=ghcr.io/berriai/litellm:main-stable
FROM ${LITELLM_IMAGE}
COPY integrations/litellm /tmp/provider-budgets-litellm
RUN pip install --no-cache-dir /tmp/provider-budgets-litellm && rm -rf /tmp/provider-budgets-litellm
