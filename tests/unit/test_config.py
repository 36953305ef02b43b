"""Config bounds: a value out of range is refused where the config is built, and `loraplex serve`
says so in one line (exit 2) before it starts anything."""

import pytest

from loraplex.server import cli
from loraplex.server.config import EngineConfig, LimitsConfig, ServerConfig


@pytest.mark.parametrize("kwargs", [{"block_size": 20}, {"block_size": 0}, {"block_size": 512}, {"block_size": -16}, {"max_loras": 0},
                                    {"max_loras": 9, "max_cpu_loras": 8}, {"kv_cache_gib": 0},
                                    {"lora_dtype": "float32"}, {"lora_dtype": "bf16"},
                                    {"grammar_compile_budget_s": 0}, {"grammar_compile_budget_s": float("nan")},
                                    {"grammar_mask_budget_ms": -5}, {"grammar_mask_budget_ms": float("nan")}])
def test_engine_config_refuses(kwargs):
    with pytest.raises(ValueError):
        EngineConfig(model_path="m", **kwargs)


def test_engine_config_accepts_block_sizes():
    assert EngineConfig(model_path="m").block_size is None
    assert EngineConfig(model_path="m", block_size=32).block_size == 32


@pytest.mark.parametrize("kwargs", [{"max_n": 0}, {"max_tokens": -1}, {"max_prompt_tokens": 0},
                                    {"max_payload_bytes": 0}, {"max_logprobs": -1}, {"max_schema_depth": 0}])
def test_limits_refuse(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        LimitsConfig(**kwargs)


def test_limits_accept_edges():
    assert LimitsConfig(max_logprobs=0, max_prompt_tokens=None, max_n=1).max_logprobs == 0


@pytest.mark.parametrize("kwargs", [{"port": 70000}, {"grpc_port": -2}, {"header_timeout_s": 0},
                                    {"stream_send_timeout_s": -1}, {"drain_timeout_s": -1},
                                    {"max_header_bytes": 0}, {"metrics_max_adapters": -1}])
def test_server_config_refuses(kwargs):
    with pytest.raises(ValueError):
        ServerConfig(**kwargs)


@pytest.mark.parametrize("flags, message", [
    (["--max-loras", "0"], "max_loras"), (["--block-size", "20"], "block_size"),
    (["--max-n", "0"], "max_n"), (["--port", "99999"], "port"), (["--header-timeout", "0"], "header_timeout_s"),
    (["--max-concurrent", "0"], "max_concurrent"), (["--max-grammar-compile-s", "-1"], "grammar_compile_budget_s"),
    (["--max-grammar-mask-ms", "-1"], "grammar_mask_budget_ms")])
def test_serve_refuses_out_of_range_in_one_line(tmp_path, capsys, flags, message):
    (tmp_path / "config.json").write_text("{}")  # --model given: nothing is converted or started
    assert cli.main(["serve", "--model", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("loraplex: ") and message in err[0]


def test_serve_refuses_before_converting_the_default_model(monkeypatch, capsys):
    from loraplex.server import default_model

    def convert(cache_dir):
        raise AssertionError("converted the default model for a command that is refused")

    monkeypatch.setattr(default_model, "ensure_default_model", convert)
    assert cli.main(["serve", "--max-loras", "0"]) == 2
    assert "max_loras" in capsys.readouterr().err


@pytest.mark.parametrize("content", [None, b"\xff\xfe\xed token"], ids=["deleted", "not-utf8"])
def test_serve_refuses_an_unreadable_token_file_in_one_line(tmp_path, capsys, content):
    (tmp_path / "config.json").write_text("{}")
    token_file = tmp_path / "token.txt"
    if content is not None:
        token_file.write_bytes(content)
    assert cli.main(["serve", "--model", str(tmp_path), "--admin-token-file", str(token_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("loraplex: --admin-token-file: ")


def test_block_size_reaches_vllm_and_the_evaluation_asks_for_32():
    from loraplex.server.engine import build_engine_args
    from loraplex.server.training.engine_eval import EvalEngineConfig

    assert build_engine_args(EngineConfig(model_path="m", block_size=32)).block_size == 32
    assert build_engine_args(EngineConfig(model_path="m")).block_size is None  # vLLM picks
    assert EvalEngineConfig(model_dir="m", adapter_dir="a", rank=8, target_modules=None, max_new_tokens=8,
                            max_model_len=64).block_size == 32


def test_lora_dtype_reaches_vllm_from_the_command_line():
    from loraplex.server.engine import build_engine_args

    args = cli.build_parser().parse_args(["serve", "--lora-dtype", "bfloat16"])
    engine_config, _, _ = cli._serve_configs(args)
    assert engine_config.lora_dtype == "bfloat16"
    assert build_engine_args(engine_config).lora_dtype == "bfloat16"
    assert build_engine_args(EngineConfig(model_path="m")).lora_dtype == "auto"  # the model's, as vLLM's default


def test_grammar_compile_budget_from_the_command_line():
    parse = cli.build_parser().parse_args
    assert cli._serve_configs(parse(["serve"]))[0].grammar_compile_budget_s == 10.0
    assert cli._serve_configs(parse(["serve", "--max-grammar-compile-s", "2.5"]))[0].grammar_compile_budget_s == 2.5
    assert cli._serve_configs(parse(["serve", "--max-grammar-compile-s", "0"]))[0].grammar_compile_budget_s is None
    assert cli._serve_configs(parse(["serve"]))[0].grammar_mask_budget_ms == 50.0
    assert cli._serve_configs(parse(["serve", "--max-grammar-mask-ms", "20"]))[0].grammar_mask_budget_ms == 20.0
    assert cli._serve_configs(parse(["serve", "--max-grammar-mask-ms", "0"]))[0].grammar_mask_budget_ms is None
