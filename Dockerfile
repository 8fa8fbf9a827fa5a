# syntax=docker/dockerfile:1
# Slim CPU serving image: the BentoML service on ONNX Runtime, without torch and without the PyTorch weights.
# Build it from the repository root after `make demo` (or any `tuneserve train`), naming the artifact to serve:
#   docker build --build-arg ARTIFACT=runs/sentiment-lora/artifact -t tuneserve .
#   docker run --rm -p 3000:3000 tuneserve
# or a directory whose sub-directories are artifacts: one service serves them all, each request naming its model
# (TUNESERVE_MODELS; a base graph that several LoRA models carry is stored once).

# Stage 1: from the artifact (or each one), only what the ONNX backend loads (core/cpu_files.py: manifest, card,
# tokenizer, the ONNX file `auto` serves). The rest of the artifact never reaches the image.
FROM python:3.11-slim AS serving-files
ARG ARTIFACT=runs/sentiment-lora/artifact
COPY core/cpu_files.py /build/cpu_files.py
COPY ${ARTIFACT} /build/artifact
RUN python /build/cpu_files.py /build/artifact /build/serving

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    BENTOML_HOME=/srv/bentoml \
    TUNESERVE_MODELS=/srv/models \
    TUNESERVE_BACKEND=auto

RUN useradd --create-home --uid 10001 tuneserve
WORKDIR /srv/app

# Dependencies first, so that code and model changes reuse this layer.
COPY requirements/serve.txt requirements/serve.txt
RUN python -m pip install --no-cache-dir -r requirements/serve.txt

COPY bentofile.yaml bentofile.yaml
COPY core/ core/
COPY service/ service/
COPY --from=serving-files /build/serving /srv/models
RUN mkdir -p /srv/bentoml && chown -R tuneserve /srv/bentoml

USER tuneserve
EXPOSE 3000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=2).status != 200)"]
CMD ["bentoml", "serve", ".", "--host", "0.0.0.0", "--port", "3000"]
