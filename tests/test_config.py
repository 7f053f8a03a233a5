import pytest
import yaml

from lingtune.config import ConfigError, Params, load_params, parse_params


def test_repo_params_file_is_valid(root):
    params = load_params(root / "params.yaml")
    assert params.data.sentiment.total >= 5000
    assert params.data.ner.characters >= 120_000
    assert params.backbone.name == "gemma3-270m"


def test_params_file_sets_every_field_explicitly(root):
    """params.yaml documents every knob: nothing silently falls back to a code default."""
    raw = yaml.safe_load((root / "params.yaml").read_text())

    def missing(model, section, prefix):
        for name, field in type(model).model_fields.items():
            key = field.alias or name
            if key not in section:
                yield f"{prefix}{key}"
            elif hasattr(getattr(model, name), "model_fields"):
                yield from missing(getattr(model, name), section[key], f"{prefix}{key}.")

    overrides = raw.pop("sft_full")  # an override section: every key it leaves out is taken from `sft`
    assert set(overrides) <= set(raw["sft"])
    assert [key for key in missing(Params(), raw, "") if key != "sft_full"] == []


def test_code_defaults_are_the_shipped_params(root):
    """One source of truth: params.yaml states every default, and the typed config's defaults equal it."""
    assert Params() == load_params(root / "params.yaml")


def test_full_baseline_inherits_the_sft_recipe():
    params = parse_params({"sft": {"max_steps": 77, "batch_size": 3, "quantization": "nf4", "compile": "loss",
                                   "lora": {"r": 4}}, "sft_full": {"lr": 3e-5}})
    full = params.sft_full
    assert (full.method, full.quantization, full.batch_size, full.lr) == ("full", "none", 3, 3e-5)
    assert full.max_steps == 250  # the baseline's own step budget unless sft_full sets one
    # LoRA trains with eager attention, the baseline with sdpa (eager broke its NER answers: docs/benchmarks.md)
    assert (params.sft.attention, full.attention) == ("eager", "sdpa")
    assert full.out_dir == "models/sft_full" and full.metrics == "reports/sft_full.json"
    assert params.sft.out_dir == "models/sft"
    with pytest.raises(ConfigError, match=r"sft_full\.lr"):
        parse_params({"sft_full": {"lr": -1}})


def test_compiled_layers_with_a_4bit_base_are_refused():
    """torch.compile cannot trace bitsandbytes' 4-bit layers (a shape error deep in inductor at the first step)."""
    with pytest.raises(ConfigError, match=r"compile: layers.*nf4"):
        parse_params({"sft": {"quantization": "nf4"}})
    assert parse_params({"sft": {"quantization": "nf4", "compile": "loss"}}).sft.compile == "loss"


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"data\.sentiment\.totl: unknown key"):
        parse_params({"data": {"sentiment": {"totl": 10}}})


def test_bad_value_is_named_with_the_value():
    with pytest.raises(ConfigError) as err:
        parse_params({"data": {"sentiment": {"total": -5}}, "backbone": {"dtype": "int3"}})
    message = str(err.value)
    assert "data.sentiment.total" in message and "-5" in message
    assert "backbone.dtype" in message and "int3" in message


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="train \\+ val \\+ test must be 1.0"):
        parse_params({"data": {"split": {"train": 0.9, "val": 0.1, "test": 0.1}}})
    with pytest.raises(ConfigError, match="min_chars"):
        parse_params({"data": {"ner": {"min_chars": 50, "max_chars": 10}}})
    with pytest.raises(ConfigError, match="positive_share"):
        parse_params({"validate": {"positive_share": [0.7, 0.3]}})
    with pytest.raises(ConfigError, match=r"evaluate\.max_lora_rank \(8\) is below sft\.lora\.r \(16\)"):
        parse_params({"sft": {"lora": {"r": 16}}})
    assert parse_params({"sft": {"lora": {"r": 16}}, "evaluate": {"max_lora_rank": 16}}).evaluate.max_lora_rank == 16
    for tasks, message in ((["ner", "pos"], "Input should be 'sentiment' or 'ner'"),
                           (["ner", "ner"], "tasks must name each of sentiment, ner at most once"),
                           ([], "at least 1 item")):
        with pytest.raises(ConfigError, match=rf"sft(\.tasks(\.1)?)?: .*{message}"):
            parse_params({"sft": {"tasks": tasks}})
    assert parse_params({"sft": {"tasks": ["ner"], "out_dir": "models/sft_ner"}}).sft.tasks == ["ner"]
    with pytest.raises(ConfigError, match=r"trains a per-task adapter into models/sft, which rl.sft_dir, "
                                          r"quantize.sources, register.variants use as the adapter of every task"):
        parse_params({"sft": {"tasks": ["ner"]}})


def test_the_task_names_config_knows_are_lingtunes_tasks():
    from lingtune import tasks
    from lingtune.config import TASK_NAMES

    assert TASK_NAMES == tasks.names()


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(listing)
