# GPU deployment: our model repository on NVIDIA's Triton image (its own tritonserver and Python backend).
# Not buildable on the CPU dev machines (no Docker engine there); keep it in step with scripts/setup.
#
#   docker build -t multilora-triton .
#   docker run --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 multilora-triton
#
# Triton 25.01 = Ubuntu 24.04 + Python 3.12: transformers 5.x needs Python >= 3.11, so the 24.x images
# (Python 3.10) do not fit our pins.
ARG TRITON_VERSION=25.01
FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3

# CUDA build of the same torch pin; KIND_GPU places the llm instance on the GPU.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG INSTANCE_KIND=KIND_GPU

ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    MULTILORA_TRITONSERVER_HOME=/opt/tritonserver \
    MULTILORA_CACHE_DIR=/opt/multilora/cache \
    PYTHONPATH=/opt/multilora

WORKDIR /opt/multilora

COPY requirements.txt .
RUN python3 -m pip install --extra-index-url "${TORCH_INDEX_URL}" -r requirements.txt \
 && sed -n 's/^# no-deps: //p' requirements.txt | xargs -r python3 -m pip install --no-deps

COPY backends/ backends/
COPY openai_frontend/ openai_frontend/
COPY scripts/ scripts/
COPY tools/ tools/
COPY model_repository/ model_repository/
COPY README.md pyproject.toml ./

# Convert the bundled SmolLM2 GGUF, build the tiny diffusion pipelines and train the demo adapters once at build
# time; mount or point MULTILORA_LLM_MODEL_PATH / MULTILORA_DIFFUSION_MODEL_PATH at other models.
RUN python3 -m tools.fixtures.smollm2 \
 && python3 -m tools.fixtures.pipelines \
 && python3 -m tools.fixtures.demo_adapters \
 && sed -i "s/kind: KIND_CPU/kind: ${INSTANCE_KIND}/" model_repository/*/config.pbtxt

# Only the OpenAI frontend listens beyond the container; tritonserver binds to 127.0.0.1 unless
# MULTILORA_TRITON_HOST=0.0.0.0 and MULTILORA_ADMIN_KEY are set (docs/security.md).
EXPOSE 9000
ENTRYPOINT ["python3", "-m", "scripts.serve"]
