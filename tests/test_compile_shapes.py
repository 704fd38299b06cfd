"""Compile-stable shapes: a compiled pipeline pads every sampling batch to `batch_size` rows and
runs its guided forward at every step, so batches of 1, 3 and 32 images compile one graph
(counted by torch._dynamo's CompileCounter backend); a compiled training step's stored text
embeddings are padded to text_encoder.max_length by the loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_bf16 import _class_pipeline
from torch._dynamo.testing import CompileCounter

from bld_t2i.data.latents import LatentDecoder, LatentItem
from bld_t2i.pipeline import BLDPipeline


@pytest.fixture
def counted_compile(monkeypatch) -> CompileCounter:
    """torch.compile with dynamo's counting backend (it runs the captured graphs eagerly:
    what is counted is dynamo's tracing, the part that recompiles for a new shape)."""
    counter = CompileCounter()
    compile = torch.compile

    def counting(fn, mode=None, dynamic=None, **kwargs):
        return compile(fn, backend=counter, dynamic=dynamic)

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", counting)
    yield counter
    torch._dynamo.reset()


def test_compiled_sampling_compiles_one_graph_over_batch_sizes(counted_compile):
    pipe = _class_pipeline(torch.float32, compile=True)
    eager = _class_pipeline(torch.float32)
    # the interval guides some of the 4 steps, so eager sampling runs B and 2B rows within one
    # call (the next test)
    kwargs = dict(steps=4, guidance=2.0, guidance_interval=(0.4, 0.8), batch_size=32)
    for n in (1, 3, 32):
        labels = [i % 3 for i in range(n)]
        bits = pipe.sample_latents(class_labels=labels, seed=10, **kwargs)
        assert bits.shape == (n, 8, 8, 16)
        if n == 3:  # the padding rows change nothing of the images asked for
            assert torch.equal(bits, eager.sample_latents(class_labels=labels, seed=10, **kwargs))
    assert counted_compile.frame_count == 1
    assert isinstance(pipe, BLDPipeline)


def test_eager_sampling_runs_the_unguided_steps_on_half_the_rows(monkeypatch):
    pipe = _class_pipeline(torch.float32)
    rows = []
    denoise = pipe._denoise
    monkeypatch.setattr(pipe, "_denoise", lambda z, t, c, **kw: rows.append(z.shape[0]) or denoise(z, t, c, **kw))
    pipe.sample_latents(class_labels=[0, 1, 2], steps=4, guidance=2.0, guidance_interval=(0.4, 0.8), batch_size=32)
    # eager: no padding, and the single-branch forward outside the interval: two shapes in one call
    assert len(rows) == 4 and set(rows) == {3, 6}


def _item(key: str, n_tokens: int) -> LatentItem:
    """A decoded latent sample as LatentDecoder.sample gives it, with `n_tokens` text tokens."""
    emb = np.ones((n_tokens, 4), np.float16)
    return LatentItem(bytes(2), "caption", key, -1, {}, (2, 2), emb)


def test_compiled_training_pads_stored_text_to_max_length():
    items = [_item("a", 3), _item("b", 5)]
    assert LatentDecoder((2, 2, 4), {(2, 2)}, 4).collate(items)["emb"].shape == (2, 5, 4)  # the batch's longest
    batch = LatentDecoder((2, 2, 4), {(2, 2)}, 4, text_length=8).collate(items)
    assert batch["emb"].shape == (2, 8, 4) and batch["emb_mask"].sum(1).tolist() == [3, 5]
    with pytest.raises(ValueError, match="sample b has 5 text tokens, more than text_encoder.max_length 4"):
        LatentDecoder((2, 2, 4), {(2, 2)}, 4, text_length=4).collate(items)
