"""parallel.compile: torch.compile'd decoder blocks give the same loss and gradients as eager.

Measured on this 2-core box: the first compiled step takes ~110 s (inductor's CPU code generation), later
steps run at eager speed. A 2-rank ZeRO-3 + selective checkpointing + compile run did not finish within
15 minutes here (recompiles under FSDP hooks), so the multi-process combination is left to GPU checks."""
import pytest

from parallel.dims import ParallelConfig
from parallel.distributed.engine import num_label_tokens, summed_ce
from parallel.engine import compile_blocks
from tests.parallel.distributed.harness import build_model, make_batch, reference


@pytest.mark.slow
def test_compiled_blocks_match_eager_in_one_process():
    model = compile_blocks(build_model("full"), ParallelConfig(compile=True)).train()
    batch = make_batch(0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = summed_ce(logits, batch["labels"]) / num_label_tokens(batch["labels"])
    loss.backward()
    ref = reference("full")
    assert float(loss) == pytest.approx(ref["losses"][0], abs=1e-6)
    # reference grads are after clipping to norm 1: compare directions scaled by the same factor
    scale = min(1.0, 1.0 / ref["norms"][0])
    worst = max(float((p.grad * scale - ref["grads"][n]).abs().max()) for n, p in model.named_parameters())
    assert worst < 1e-6
