"""parallel_backend.parallel.plan: the split hooks on a toy model, in one process (the split itself needs no
collective): a tensor held in a tuple (SeqSplit.item, ComfyUI 0.33's LTX rope) is cut once, the tuple's other items
pass; a wildcard pattern that matches no module names none, a plain name that matches none fails."""
import pytest
import torch
import torch.nn as nn

from parallel_backend.parallel.attention import SequenceParallelGroups
from parallel_backend.parallel.plan import ParallelPlan, SeqSplit, SequenceState, apply_sequence_parallel

pytestmark = pytest.mark.engine


class _Block(nn.Module):
    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def forward(self, x, pe=None):
        self.seen.append((x.shape[1], pe[0].shape[1], pe[1]))
        return x


def _blocks(seen, n=2):
    model = nn.Module()
    model.blocks = nn.ModuleList(_Block(seen) for _ in range(n))
    return model


def _plan(*patterns):
    return ParallelPlan(seq_split_inputs={p: {0: SeqSplit(1, first_only=True)} for p in patterns},
                        seq_split_kwargs={p: {"pe": SeqSplit(1, per_token=True, item=0)} for p in patterns})


@pytest.mark.parametrize("index", [0, 1])
def test_a_tuple_held_tensor_is_cut_to_this_ranks_tokens_and_the_rest_passes(index):
    seen = []
    model = _blocks(seen)
    state = SequenceState(SequenceParallelGroups(ulysses_size=2), index)
    apply_sequence_parallel(model, _plan("blocks.[0-9]", "blocks.[0-9][0-9]"), state)
    state.begin_forward()
    x, table = torch.randn(1, 7, 4), torch.arange(7.0).view(1, 7, 1).expand(1, 7, 3)
    for block in model.blocks:
        x = block(x, pe=(table, "split mode"))
    assert seen == [(4, 4, "split mode")] * 2  # 7 tokens padded to 8: 4 a rank, each block's table cut once


def test_cut_rows_are_this_ranks_tokens():
    state = SequenceState(SequenceParallelGroups(ulysses_size=2), 1)
    seen = []
    model = nn.Module()
    model.block = _Block(seen)
    out = {}
    model.block.register_forward_hook(lambda m, a, kw, o: out.update(pe=kw["pe"]), with_kwargs=True)
    apply_sequence_parallel(model, ParallelPlan(seq_split_inputs={"block": {0: SeqSplit(1)}},
                                                seq_split_kwargs={"block": {"pe": SeqSplit(1, per_token=True,
                                                                                           item=0)}}), state)
    state.begin_forward()
    model.block(torch.zeros(1, 7, 2), pe=(torch.arange(7.0).view(1, 7), 5))
    assert out["pe"][0].tolist() == [[4.0, 5.0, 6.0, 6.0]] and out["pe"][1] == 5  # padding repeats the last token


def test_a_wildcard_matching_no_module_names_none_and_a_plain_name_fails():
    state = SequenceState(SequenceParallelGroups(ulysses_size=2), 0)
    assert len(apply_sequence_parallel(_blocks([]), _plan("blocks.[0-9]", "blocks.[0-9][0-9]"), state)) == 4
    with pytest.raises(AttributeError):
        apply_sequence_parallel(_blocks([]), _plan("blocks.7"), state)
