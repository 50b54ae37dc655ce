from hpc.tracking import REDACTED, Tracker, flatten, redact


def test_redact_keys_and_values_but_not_lookalikes():
    cfg = {
        "executor": {
            "env": {
                "HF_TOKEN": "hf_abcdefghijklmnopqrstuvwxyz",
                "WANDB_API_KEY": "x",
                "DB_PASSWORD": "p",
                "NCCL_DEBUG": "INFO",
            }
        },
        "eval": {"max_new_tokens": 24},
        "note": "use sk-abcdefghijklmnopqrstuvwx please",
    }
    out = redact(cfg)
    env = out["executor"]["env"]
    assert env["HF_TOKEN"] == env["WANDB_API_KEY"] == env["DB_PASSWORD"] == REDACTED
    assert env["NCCL_DEBUG"] == "INFO" and out["eval"]["max_new_tokens"] == 24
    assert out["note"] == f"use {REDACTED} please"


def test_params_in_mlflow_are_redacted(tmp_path):
    t = Tracker(f"sqlite:///{tmp_path / 'm.db'}")
    run = t.start_parent(
        "e",
        tmp_path / "art",
        "r",
        {"executor": {"env": {"HF_TOKEN": "hf_secretsecretsecretsecret"}}, "stages": [{"lr": 0.1}]},
        {},
    )
    params = t.client.get_run(run).data.params
    assert params["executor.env.HF_TOKEN"] == REDACTED and params["stages.0.lr"] == "0.1"
    assert "hf_secret" not in str(params)


def test_flatten_lists_of_sections():
    assert flatten({"a": [{"b": 1}], "c": [1, 2]}) == {"a.0.b": "1", "c": "[1, 2]"}


def test_secret_values_under_innocent_keys_are_redacted():
    cfg = {
        "executor": {"setup": ["module load cuda", "export WANDB_API_KEY=0123456789abcdef0123456789abcdef01234567"]},
        "tracking": {"uri": "http://alice:s3cretpw@mlflow.example.com:5000"},
        "headers": ["Authorization: Bearer abcDEF123456ghiJKL7890"],
    }
    out = redact(cfg)
    assert out["executor"]["setup"] == ["module load cuda", f"export WANDB_API_KEY={REDACTED}"]
    assert out["tracking"]["uri"] == f"http://alice:{REDACTED}@mlflow.example.com:5000"
    assert out["headers"] == [f"Authorization: Bearer {REDACTED}"]
    flat = flatten(out)
    assert not any(s in str(flat) for s in ("0123456789abcdef", "s3cretpw", "abcDEF123456"))
