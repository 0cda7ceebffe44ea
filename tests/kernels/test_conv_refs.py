"""causal-conv1d's pure-torch references (``causal_conv1d_ref``, ``causal_conv1d_update_ref``: the semantics its
CUDA kernels are tested against) against amer's causal conv (:mod:`amer.ops.conv`), in its (B, C, T) layout:
packed documents through ``seq_idx``, initial states with final states, and the decoding update. fp32,
tolerance 1e-5."""

from __future__ import annotations

import pytest
import torch

from amer.blocks.doc_ids import DocIds
from amer.ops.conv import causal_conv1d

interface = pytest.importorskip("causal_conv1d.causal_conv1d_interface")
TOL = dict(rtol=1e-5, atol=1e-5)
B, T, C, K = 2, 19, 16, 4


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, C, generator=g), torch.randn(C, K, generator=g), torch.randn(C, generator=g),
            torch.randn(B, K - 1, C, generator=g))


def test_documents_match_seq_idx() -> None:
    x, w, bias, _ = data()
    docs = DocIds(torch.tensor([[3] * 6 + [8] * 2 + [5] * 11, [1] * T]))
    y, _ = causal_conv1d(x, w, bias, position=docs.position)
    ref = interface.causal_conv1d_ref(x.transpose(1, 2), w, bias, seq_idx=docs.index.to(torch.int32)).transpose(1, 2)
    print(f"\nparity conv documents vs causal_conv1d_ref(seq_idx): {float((y - ref).abs().max()):.2e}")
    torch.testing.assert_close(y, ref, **TOL)
    # negative control: the reference without documents differs from amer's with them
    plain = interface.causal_conv1d_ref(x.transpose(1, 2), w, bias).transpose(1, 2)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(y, plain, **TOL)


def test_initial_and_final_states_match() -> None:
    x, w, bias, state = data(1)
    y, new_state = causal_conv1d(x, w, bias, state)
    ref, final = interface.causal_conv1d_ref(x.transpose(1, 2), w, bias, initial_states=state.transpose(1, 2),
                                             return_final_states=True)
    print(f"\nparity conv initial/final states: y {float((y - ref.transpose(1, 2)).abs().max()):.2e}, "
          f"state {float((new_state - final.transpose(1, 2)).abs().max()):.2e}")
    torch.testing.assert_close(y, ref.transpose(1, 2), **TOL)
    torch.testing.assert_close(new_state, final.transpose(1, 2), **TOL)
    lost = interface.causal_conv1d_ref(x.transpose(1, 2), w, bias).transpose(1, 2)  # negative control: no state
    with pytest.raises(AssertionError):
        torch.testing.assert_close(y, lost, **TOL)


def test_decoding_update_matches() -> None:
    x, w, bias, state = data(2)
    ref_state = state.transpose(1, 2).clone()  # causal-conv1d keeps (B, C, K - 1) and updates it in place
    for t in range(3):
        y, state = causal_conv1d(x[:, t:t + 1], w, bias, state)
        ref = interface.causal_conv1d_update_ref(x[:, t], ref_state, w, bias)
        torch.testing.assert_close(y[:, 0], ref, **TOL)
        torch.testing.assert_close(state, ref_state.transpose(1, 2), **TOL)
    with pytest.raises(AssertionError):  # negative control: a step that forgot the window
        torch.testing.assert_close(causal_conv1d(x[:, 3:4], w, bias, torch.zeros_like(state))[0][:, 0],
                                   interface.causal_conv1d_update_ref(x[:, 3], ref_state, w, bias), **TOL)
