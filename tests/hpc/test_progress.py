from hpc.progress import describe


def test_describe_training_validation_and_data_events():
    sft = {"step": 20, "max_steps": 100, "loss": 1.5, "tokens_per_s": 12000.0, "elapsed_s": 10.0}
    assert describe(sft) == "step 20/100  loss 1.5000  12,000 tok/s  ETA 40s"
    gpu = sft | {"mfu": 0.4812, "peak_mem_gib": 30.04, "peak_mem_gib_max": 31.26}
    assert describe(gpu) == "step 20/100  loss 1.5000  12,000 tok/s  MFU 48.1%  mem 31.3 GiB  ETA 40s"
    dpo = {"step": 10, "max_steps": 20, "loss": 0.6, "accuracy": 0.75, "kl": 0.01, "pairs_per_s": 9.4, "elapsed_s": 5.0}
    assert describe(dpo) == "step 10/20  loss 0.6000  acc 0.7500  kl 0.0100  9 pairs/s  ETA 5s"
    ppo = {"step": 1, "max_steps": 2, "tokens_per_s": 950.0, "rollouts_per_s": 2.0, "generation_tokens_per_s": 120.4}
    ppo |= {"mfu": 0.1234, "peak_mem_gib": 2.0, "elapsed_s": 4.0}
    assert describe(ppo) == "step 1/2  950 tok/s  2 rollouts/s  120 gen tok/s  MFU 12.3%  mem 2.0 GiB  ETA 4s"
    assert (
        describe({"step": 0, "val_loss": 0.6931, "val_accuracy": 0.0}) == "step 0  val_loss 0.6931  val_accuracy 0.0000"
    )
    assert describe({"step": "exact_find", "done": 2, "total": 8}) == "exact_find (2/8)"
    assert describe(None) == ""
