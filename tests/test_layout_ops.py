"""The layout changes real models go through: stacked experts, RoPE permutation, per-head fused
qkv, grouped-query splits and padded vocabularies, each proven on values, on Adam's state and
through its inverse; and the README's examples for them run as written."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import ckptmigrate as cm
from ckptmigrate.schema.ops import OpError

ROOT = Path(__file__).resolve().parent.parent
TOL = {"rtol": 1e-5, "atol": 1e-6}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def two_step_schema(ops: list) -> cm.Schema:
    schema = cm.Schema("net", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", ops)
    return schema


def adam_state(model: nn.Module, batches: int = 3) -> torch.optim.Adam:
    """A real Adam, a few steps on a fixed loss, state keyed by name (``param_names``)."""
    opt = torch.optim.Adam(model.named_parameters(), lr=0.01)
    for i in range(batches):
        opt.zero_grad()
        loss = sum(
            (p * torch.randn(p.shape, generator=gen(i))).sum() ** 2 for p in model.parameters()
        )
        loss.backward()
        opt.step()
    return opt


def state_by_name(opt_sd: dict) -> dict[str, dict]:
    names = [n for g in opt_sd["param_groups"] for n in g["param_names"]]
    positions = [p for g in opt_sd["param_groups"] for p in g["params"]]
    return {names[i]: opt_sd["state"][p] for i, p in enumerate(positions) if p in opt_sd["state"]}


def upgrade_on_disk(tmp_path: Path, model: nn.Module, opt, schema: cm.Schema) -> cm.Checkpoint:
    """Save model + optimizer with torch.save, upgrade the file, read it back."""
    src, dst = tmp_path / "old.pth", tmp_path / "new.pth"
    torch.save({"model": model.state_dict(), "optimizer": copy.deepcopy(opt.state_dict())}, src)
    ckpt = cm.load(src, schema=schema, from_version="1.0.0")
    cm.save(dst, ckpt)
    return cm.load(dst, schema=schema)


def round_trip(op, sd: dict[str, torch.Tensor]) -> None:
    ckpt = cm.Checkpoint(dict(sd))
    op.apply(ckpt)
    inverse = op.inverse()
    assert inverse is not None
    inverse.apply(ckpt)
    assert list(ckpt.state_dict) == list(sd)
    for key, value in sd.items():
        torch.testing.assert_close(ckpt.state_dict[key], value, rtol=0, atol=0)


# -- stacked experts ---------------------------------------------------------------------------


class Experts(nn.Module):
    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(3, 5, bias=False) for _ in range(n))


class StackedExperts(nn.Module):
    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.experts = nn.Module()
        self.experts.weight = nn.Parameter(torch.zeros(n, 5, 3))

    def forward(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x @ self.experts.weight[i].T


STACK = cm.ops.Stack("experts.{i}.weight", "experts.weight", count=4)


def test_stack_puts_expert_i_at_index_i_and_each_expert_computes_as_before():
    torch.manual_seed(0)
    old = Experts()
    ckpt = cm.Checkpoint(dict(old.state_dict()))
    STACK.apply(ckpt)
    assert list(ckpt.state_dict) == ["experts.weight"]
    new = StackedExperts()
    new.load_state_dict(ckpt.state_dict)
    x = torch.randn(2, 3, generator=gen(1))
    for i in range(4):
        torch.testing.assert_close(new(x, i), old.experts[i](x), **TOL)


def test_stack_fills_other_fields_per_layer_and_keeps_other_keys():
    sd = {
        f"layers.{layer}.experts.{i}.w1.weight": torch.full((2, 2), 10.0 * layer + i)
        for layer in range(2)
        for i in range(3)
    }
    sd["norm.weight"] = torch.ones(2)
    ckpt = cm.Checkpoint(dict(sd))
    cm.ops.Stack("layers.{l}.experts.{i}.w1.weight", "layers.{l}.experts.w1", count=3).apply(ckpt)
    assert list(ckpt.state_dict) == ["layers.0.experts.w1", "layers.1.experts.w1", "norm.weight"]
    assert ckpt.state_dict["layers.1.experts.w1"][:, 0, 0].tolist() == [10.0, 11.0, 12.0]


@pytest.mark.parametrize(
    ("present", "message"),
    [
        ([0, 1, 3], r"\['experts\.2\.weight'\] are missing"),  # a gap
        ([0, 1, 2], r"\['experts\.3\.weight'\] are missing"),  # the last expert absent
        ([0, 1, 2, 3, 4], r"\['experts\.4\.weight'\] lie beyond count=4"),
    ],
)
def test_stack_refuses_a_gap_a_missing_or_an_extra_expert_naming_it(present, message):
    ckpt = cm.Checkpoint({f"experts.{i}.weight": torch.zeros(2) for i in present})
    with pytest.raises(OpError, match=message):
        STACK.apply(ckpt)


def test_stack_refuses_parts_of_different_shapes():
    sd = {f"experts.{i}.weight": torch.zeros(2 + (i == 2)) for i in range(4)}
    with pytest.raises(OpError, match="differ in shape"):
        STACK.apply(cm.Checkpoint(sd))


def test_unstack_refuses_a_tensor_of_another_count():
    with pytest.raises(OpError, match=r"not 4 along dim 0"):
        STACK.inverse().apply(cm.Checkpoint({"experts.weight": torch.zeros(3, 2)}))


def test_stack_and_unstack_round_trip_exactly():
    sd = {f"experts.{i}.weight": torch.randn(5, 3, generator=gen(i)) for i in range(4)}
    round_trip(STACK, sd)
    stacked = cm.Checkpoint(dict(sd))
    STACK.apply(stacked)
    round_trip(STACK.inverse(), stacked.state_dict)


def test_stacking_moves_each_experts_adam_moments_to_its_index(tmp_path):
    torch.manual_seed(0)
    old = Experts()
    opt = adam_state(old)
    new_ckpt = upgrade_on_disk(tmp_path, old, opt, two_step_schema([STACK]))
    new = StackedExperts()
    new.load_state_dict(new_ckpt.state_dict)
    new_opt = torch.optim.Adam(new.named_parameters(), lr=0.01)
    new_opt.load_state_dict(new_ckpt.optimizer)
    before = state_by_name(opt.state_dict())
    moved = new_opt.state[new.experts.weight]
    for fld in ("exp_avg", "exp_avg_sq"):
        for i in range(4):
            torch.testing.assert_close(moved[fld][i], before[f"experts.{i}.weight"][fld], **TOL)
    assert float(moved["step"]) == 3


def test_unstacking_splits_the_moments_back_per_expert(tmp_path):
    torch.manual_seed(0)
    old = StackedExperts()
    nn.init.normal_(old.experts.weight)
    opt = adam_state(old)
    new_ckpt = upgrade_on_disk(tmp_path, old, opt, two_step_schema([STACK.inverse()]))
    new = Experts()
    new.load_state_dict(new_ckpt.state_dict)
    new_opt = torch.optim.Adam(new.named_parameters(), lr=0.01)
    new_opt.load_state_dict(new_ckpt.optimizer)
    stacked = state_by_name(opt.state_dict())["experts.weight"]
    for i in range(4):
        state = new_opt.state[new.experts[i].weight]
        torch.testing.assert_close(state["exp_avg_sq"], stacked["exp_avg_sq"][i], **TOL)
        torch.testing.assert_close(new.experts[i].weight, old.experts.weight[i], **TOL)


# -- rotary layouts ----------------------------------------------------------------------------

N_HEADS, HEAD_DIM, HIDDEN, SEQ = 2, 8, 12, 5


def rope_angles() -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).double() / HEAD_DIM))
    return torch.outer(torch.arange(SEQ).double(), inv_freq)  # (seq, head_dim/2)


def rope_meta(x: torch.Tensor) -> torch.Tensor:
    """Meta's llama: adjacent dims (2j, 2j+1) of a head are one complex number."""
    freqs = torch.polar(torch.ones_like(rope_angles()), rope_angles())
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs).flatten(-2)


def rope_hf(x: torch.Tensor) -> torch.Tensor:
    """HF's llama: dim j pairs with j + head_dim/2 (``rotate_half``)."""
    angles = torch.cat([rope_angles()] * 2, dim=-1)
    x1, x2 = x[..., : HEAD_DIM // 2], x[..., HEAD_DIM // 2 :]
    return x * angles.cos() + torch.cat([-x2, x1], dim=-1) * angles.sin()


def scores(wq: torch.Tensor, wk: torch.Tensor, rope, x: torch.Tensor) -> torch.Tensor:
    q = (x @ wq.T).reshape(SEQ, N_HEADS, HEAD_DIM).transpose(0, 1)
    k = (x @ wk.T).reshape(SEQ, N_HEADS, HEAD_DIM).transpose(0, 1)
    return rope(q) @ rope(k).transpose(-1, -2)


def test_meta_rope_on_old_weights_scores_as_hf_rope_on_permuted_weights():
    x = torch.randn(SEQ, HIDDEN, generator=gen(0), dtype=torch.float64)
    wq, wk = (
        torch.randn(N_HEADS * HEAD_DIM, HIDDEN, generator=gen(s), dtype=torch.float64)
        for s in (1, 2)
    )
    ckpt = cm.Checkpoint({"q.weight": wq, "k.weight": wk})
    cm.ops.PermuteForRope("{p}.weight", n_heads=N_HEADS).apply(ckpt)
    meta = scores(wq, wk, rope_meta, x)
    hf = scores(ckpt.state_dict["q.weight"], ckpt.state_dict["k.weight"], rope_hf, x)
    torch.testing.assert_close(hf, meta, rtol=1e-10, atol=1e-10)
    # the unpermuted weights under HF's rotary give other scores: the permutation is needed
    assert not torch.allclose(scores(wq, wk, rope_hf, x), meta, atol=1e-3)


def test_permute_for_rope_is_hfs_convert_llama_permute_and_its_inverse_undoes_it():
    w = torch.randn(N_HEADS * HEAD_DIM, HIDDEN, generator=gen(3))
    # convert_llama_weights_to_hf.permute, as written there
    dim1, dim2 = w.shape
    hf = w.view(N_HEADS, dim1 // N_HEADS // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)
    op = cm.ops.PermuteForRope("q.weight", n_heads=N_HEADS)
    torch.testing.assert_close(op.transform(w), hf, rtol=0, atol=0)
    round_trip(op, {"q.weight": w, "q.bias": torch.randn(N_HEADS * HEAD_DIM, generator=gen(4))})
    round_trip(cm.ops.PermuteForRope("q.{kind}", n_heads=N_HEADS), {"q.bias": w[:, 0].clone()})


def test_permute_for_rope_refuses_rows_that_are_not_whole_heads():
    with pytest.raises(OpError, match="3 heads"):
        cm.ops.PermuteForRope("q.weight", n_heads=3).apply(
            cm.Checkpoint({"q.weight": torch.zeros(16, 4)})
        )


def test_permuting_for_rope_permutes_adams_moments_with_the_rows(tmp_path):
    torch.manual_seed(0)
    model = nn.Module()
    model.q = nn.Linear(HIDDEN, N_HEADS * HEAD_DIM)
    opt = adam_state(model)
    op = cm.ops.PermuteForRope("q.{kind}", n_heads=N_HEADS)
    new = upgrade_on_disk(tmp_path, model, opt, two_step_schema([op]))
    before, after = state_by_name(opt.state_dict()), state_by_name(new.optimizer)
    for key in ("q.weight", "q.bias"):
        torch.testing.assert_close(
            new.state_dict[key], op.transform(model.state_dict()[key]), **TOL
        )
        for fld in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(after[key][fld], op.transform(before[key][fld]), **TOL)
            assert not torch.equal(after[key][fld], before[key][fld])


# -- fused qkv: NeoX's per-head interleaving, grouped-query sizes -------------------------------


class NeoXAttention(nn.Module):
    """GPT-NeoX's fused projection: rows [h0_q, h0_k, h0_v, h1_q, ...], ``head_dim`` each."""

    def __init__(self, heads: int = 3, head_dim: int = 4, hidden: int = 6) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.query_key_value = nn.Linear(hidden, 3 * heads * head_dim)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # as transformers' GPTNeoXAttention: view (..., heads, 3 * head_dim), chunk in 3
        fused = self.query_key_value(x).view(*x.shape[:-1], self.heads, 3 * self.head_dim)
        return tuple(t.flatten(-2) for t in fused.chunk(3, dim=-1))


class SeparateAttention(nn.Module):
    def __init__(self, q: int = 12, kv: int = 12, hidden: int = 6) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(hidden, q), nn.Linear(hidden, kv), nn.Linear(hidden, kv)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.q(x), self.k(x), self.v(x)


TARGETS = ["q.{kind}", "k.{kind}", "v.{kind}"]
INTERLEAVED = cm.ops.SplitInterleaved("query_key_value.{kind}", TARGETS, sizes=[4, 4, 4])


def migrated(op, model: nn.Module, target: nn.Module) -> nn.Module:
    ckpt = cm.Checkpoint(dict(model.state_dict()))
    op.apply(ckpt)
    target.load_state_dict(ckpt.state_dict)
    return target


def test_a_flat_split_of_neox_qkv_has_the_right_shapes_and_the_wrong_values():
    torch.manual_seed(0)
    old, x = NeoXAttention(), torch.randn(2, 6, generator=gen(0))
    flat = cm.ops.Split("query_key_value.{kind}", TARGETS)
    wrong = migrated(flat, old, SeparateAttention())  # loads strictly: the shapes fit
    assert not torch.allclose(wrong.qkv(x)[0], old.qkv(x)[0], atol=1e-3)
    right = migrated(INTERLEAVED, old, SeparateAttention())
    for new_part, old_part in zip(right.qkv(x), old.qkv(x)):
        torch.testing.assert_close(new_part, old_part, **TOL)


def test_interleaved_split_and_merge_round_trip_exactly():
    sd = {
        "query_key_value.weight": torch.randn(36, 6, generator=gen(1)),
        "query_key_value.bias": torch.randn(36, generator=gen(2)),
    }
    round_trip(INTERLEAVED, sd)
    # along dim 1, and gate/up interleaved row by row
    round_trip(
        cm.ops.SplitInterleaved("w", ["a", "b"], dim=1, sizes=[1, 1]), {"w": torch.randn(3, 8)}
    )


def test_interleaved_split_refuses_a_size_that_is_not_whole_groups():
    with pytest.raises(OpError, match="not a whole number of groups"):
        INTERLEAVED.apply(cm.Checkpoint({"query_key_value.weight": torch.zeros(30, 6)}))


def test_a_grouped_query_split_with_unequal_sizes_reproduces_each_projection():
    torch.manual_seed(0)
    heads, kv_heads, head_dim, hidden = 4, 2, 3, 6
    sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    fused = nn.Linear(hidden, sum(sizes))
    x = torch.randn(2, hidden, generator=gen(0))
    expected = fused(x).split(sizes, dim=-1)
    split = cm.ops.Split("fused.{kind}", TARGETS, sizes=sizes)
    holder = nn.Module()
    holder.fused = fused
    new = migrated(split, holder, SeparateAttention(q=12, kv=6))
    for got, want in zip(new.qkv(x), expected):
        torch.testing.assert_close(got, want, **TOL)
    with pytest.raises(OpError, match=r"sizes \[12, 6\] for 3 targets"):
        cm.ops.Split("fused.{kind}", TARGETS, sizes=[12, 6]).apply(
            cm.Checkpoint(dict(holder.state_dict()))
        )
    round_trip(split, dict(holder.state_dict()))


def test_an_interleaved_split_carries_adams_moments_row_for_row(tmp_path):
    torch.manual_seed(0)
    old = NeoXAttention()
    opt = adam_state(old)
    new_ckpt = upgrade_on_disk(tmp_path, old, opt, two_step_schema([INTERLEAVED]))
    new = SeparateAttention()
    new.load_state_dict(new_ckpt.state_dict)
    new_opt = torch.optim.Adam(new.named_parameters(), lr=0.01)
    new_opt.load_state_dict(new_ckpt.optimizer)
    fused = state_by_name(opt.state_dict())["query_key_value.weight"]["exp_avg"]
    per_head = fused.view(3, 3, 4, 6)  # (head, q/k/v, head_dim, hidden)
    for j, part in enumerate((new.q, new.k, new.v)):
        torch.testing.assert_close(
            new_opt.state[part.weight]["exp_avg"], per_head[:, j].reshape(12, 6), **TOL
        )


# -- padded vocabularies ------------------------------------------------------------------------


def test_pad_to_a_multiple_of_64_fills_the_stated_value_and_slices_back():
    emb = torch.randn(100, 4, generator=gen(0))
    op = cm.ops.Pad("embed.weight", multiple=64, from_size=100, fill=-1.0)
    ckpt = cm.Checkpoint({"embed.weight": emb})
    op.apply(ckpt)
    padded = ckpt.state_dict["embed.weight"]
    assert padded.shape == (128, 4)
    torch.testing.assert_close(padded[:100], emb, rtol=0, atol=0)
    assert bool((padded[100:] == -1.0).all())
    assert op.inverse() == cm.ops.Slice("embed.weight", 100, from_size=128, fill=-1.0)
    round_trip(op, {"embed.weight": emb})


def test_pad_with_the_mean_fills_new_rows_with_the_mean_of_the_old_ones():
    emb = torch.randn(10, 4, generator=gen(1))
    ckpt = cm.Checkpoint({"embed.weight": emb})
    cm.ops.Pad("embed.weight", size=16, fill="mean").apply(ckpt)
    for row in ckpt.state_dict["embed.weight"][10:]:
        torch.testing.assert_close(row, emb.mean(dim=0), **TOL)


def test_pad_refuses_a_tensor_of_another_size_and_a_fill_it_does_not_know():
    with pytest.raises(OpError, match="not 100"):
        cm.ops.Pad("e", multiple=64, from_size=100).apply(cm.Checkpoint({"e": torch.zeros(99, 2)}))
    with pytest.raises(OpError, match="expected a number or 'mean'"):
        cm.ops.Pad("e", size=8, fill="median").apply(cm.Checkpoint({"e": torch.zeros(4, 2)}))
    assert cm.ops.Pad("e", multiple=64).inverse() is None  # the size before is unknown


def test_padding_keeps_old_rows_moments_and_gives_new_rows_zero_state(tmp_path):
    torch.manual_seed(0)
    old = nn.Module()
    old.embed = nn.Embedding(100, 4)
    opt = adam_state(old)
    op = cm.ops.Pad("embed.weight", multiple=64, from_size=100, fill="mean")
    new_ckpt = upgrade_on_disk(tmp_path, old, opt, two_step_schema([op]))
    new = nn.Module()
    new.embed = nn.Embedding(128, 4)
    new.load_state_dict(new_ckpt.state_dict)
    new_opt = torch.optim.Adam(new.named_parameters(), lr=0.01)
    new_opt.load_state_dict(new_ckpt.optimizer)
    before = state_by_name(opt.state_dict())["embed.weight"]
    state = new_opt.state[new.embed.weight]
    for fld in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(state[fld][:100], before[fld], **TOL)
        assert bool((state[fld][100:] == 0).all()), fld  # not the "mean" of the moments
    # and back: slicing drops the new rows' state with them
    back = cm.upgrade(new_ckpt, two_step_schema([op]), to="1.0.0")
    torch.testing.assert_close(
        state_by_name(back.optimizer)["embed.weight"]["exp_avg"], before["exp_avg"], **TOL
    )


@pytest.mark.parametrize("experts", [2, 4, 8])
def test_stack_without_a_count_stacks_every_expert_the_file_holds_and_unstacks_them_back(experts):
    sd = {f"l.{layer}.experts.{i}.w": torch.randn(3, 2, generator=gen(10 * layer + i))
          for layer in range(2) for i in range(experts)}  # fmt: skip
    any_count = cm.ops.Stack("l.{l}.experts.{i}.w", "l.{l}.experts.w", count=None)
    ckpt = cm.Checkpoint(dict(sd))
    any_count.apply(ckpt)
    assert {k: tuple(v.shape) for k, v in ckpt.state_dict.items()} == {
        "l.0.experts.w": (experts, 3, 2),
        "l.1.experts.w": (experts, 3, 2),
    }
    any_count.inverse().apply(ckpt)
    assert list(ckpt.state_dict) == list(sd)
    for key, value in sd.items():
        torch.testing.assert_close(ckpt.state_dict[key], value, rtol=0, atol=0)


def test_stack_without_a_count_still_refuses_a_gap():
    ckpt = cm.Checkpoint({f"experts.{i}.weight": torch.zeros(2) for i in (0, 1, 3)})
    with pytest.raises(OpError, match=r"stacking 4 tensors .*\['experts\.2\.weight'\] are missing"):
        cm.ops.Stack("experts.{i}.weight", "experts.weight", count=None).apply(ckpt)


def test_unstack_without_a_count_refuses_to_trace_optimizer_state_by_keys_alone():
    undo = cm.ops.Unstack("experts.weight", "experts.{i}.weight", count=None)
    with pytest.raises(OpError, match="give count= so that optimizer state can follow"):
        undo.trace(["experts.weight"])


# -- review16: experts the router never picked -------------------------------------------------


def routed_adam(model: Experts, routed: list[list[int]]) -> torch.optim.Adam:
    """A real Adam where batch ``b`` trains only the experts ``routed[b]``: an expert no token
    reached has no state at all (Adam makes it on the first gradient), one reached later has a
    smaller ``step``, as in every MoE run."""
    opt = torch.optim.Adam(model.named_parameters(), lr=0.01)
    for b, experts in enumerate(routed):
        opt.zero_grad()
        loss = sum(
            (model.experts[i].weight * torch.randn(5, 3, generator=gen(b))).sum() ** 2
            for i in experts
        )
        loss.backward()
        opt.step()
    return opt


def test_stacking_experts_when_one_was_never_routed_keeps_the_others_adam_moments(tmp_path):
    """Expert 3 got no gradient, so it has no Adam state; the stacked parameter must still
    carry experts 0-2's moments (expert 3's rows fresh, zero) or refuse clearly. Today the
    stacked parameter silently gets no state at all: every expert's moments are lost."""
    torch.manual_seed(0)
    old = Experts()
    opt = routed_adam(old, [[0, 1, 2], [0, 1, 2]])
    before = state_by_name(opt.state_dict())
    assert "experts.3.weight" not in before
    try:
        new_ckpt = upgrade_on_disk(tmp_path, old, opt, two_step_schema([STACK]))
    except cm.CkptMigrateError:
        return  # a clear refusal keeps nothing silently lost
    state = state_by_name(new_ckpt.optimizer)
    assert "experts.weight" in state, "the stacked experts lost all their optimizer state"
    for i in range(3):
        torch.testing.assert_close(
            state["experts.weight"]["exp_avg"][i], before[f"experts.{i}.weight"]["exp_avg"], **TOL
        )


def test_stacking_experts_whose_adam_steps_differ_is_not_silent(tmp_path):
    """Expert 3 was first routed in the third batch: its ``step`` is 1, the others' 3. One
    stacked parameter has one ``step``, so Adam's bias correction of some rows changes; today
    expert 0's step is taken without a word."""
    torch.manual_seed(0)
    old = Experts()
    opt = routed_adam(old, [[0, 1, 2], [0, 1, 2], [0, 1, 2, 3]])
    steps = {k: float(v["step"]) for k, v in state_by_name(opt.state_dict()).items()}
    assert steps["experts.0.weight"] == 3 and steps["experts.3.weight"] == 1
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            upgrade_on_disk(tmp_path, old, opt, two_step_schema([STACK]))
        except cm.CkptMigrateError:
            return
    assert any("step" in str(w.message) for w in caught), "differing steps merged silently"


# -- review16: odd arguments, plain answers ----------------------------------------------------


def test_pad_refuses_a_fill_that_the_tensors_dtype_would_change():
    """fill=0.5 on an integer (token id / position) table writes 0 without a word."""
    with pytest.raises(OpError, match="fill"):
        cm.ops.Pad("w", size=8, fill=0.5).transform(torch.arange(6))


def test_an_interleaved_split_along_the_last_dim_counted_from_the_end_is_the_same_split():
    """Split takes dim=-1 as torch does; its interleaved sibling reshapes with shape[:dim] and
    shape[dim + 1:], which for dim=-1 is the whole shape again."""
    fused = torch.arange(24.0).reshape(2, 12)
    by_end = cm.ops.SplitInterleaved("w", ["g", "u"], dim=-1, sizes=[1, 1]).cut("w", fused)
    by_index = cm.ops.SplitInterleaved("w", ["g", "u"], dim=1, sizes=[1, 1]).cut("w", fused)
    for a, b in zip(by_end, by_index):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


ODD = {
    "pad multiple=0": lambda: cm.ops.Pad("w", multiple=0).apply(
        cm.Checkpoint({"w": torch.ones(6)})
    ),
    "rope n_heads=0": lambda: cm.ops.PermuteForRope("w", n_heads=0).apply(
        cm.Checkpoint({"w": torch.ones(8, 2)})
    ),
    "interleaved sizes 0": lambda: cm.ops.SplitInterleaved("w", ["a", "b"], sizes=[0, 0]).apply(
        cm.Checkpoint({"w": torch.ones(4)})
    ),
    "stack a non-tensor": lambda: cm.ops.Stack("e.{i}", "e", count=2).apply(
        cm.Checkpoint({"e.0": 1, "e.1": 2})
    ),
    "pad a 0-d tensor": lambda: cm.ops.Pad("w", size=2).apply(
        cm.Checkpoint({"w": torch.tensor(1.0)})
    ),
    "template with {0}": lambda: cm.ops.Split("{p}.w", ["{p}.{0}", "{p}.x"]).apply(
        cm.Checkpoint({"a.w": torch.ones(4)})
    ),
}


@pytest.mark.parametrize("case", sorted(ODD))
def test_an_op_given_odd_arguments_raises_an_op_error_naming_itself(case):
    """Inside an upgrade these become ``MigrationError: ... failed: ZeroDivisionError: integer
    division or modulo by zero``: no traceback, but nothing that says which argument is wrong."""
    with pytest.raises(OpError):
        ODD[case]()


def test_a_merge_of_unequal_parts_without_sizes_is_not_undone_into_other_shapes():
    """``Merge`` without ``sizes=`` says it is reversible, and its inverse cuts equal chunks:
    a (4, 2) and b (2, 2) merged come back as two (3, 2) tensors, b holding a row of a. That
    inverse is what a file's history records for older code to run. The merge must refuse
    parts of unequal size without ``sizes=`` (or its inverse must cut what it joined)."""
    sd = {"a": torch.zeros(4, 2), "b": torch.ones(2, 2)}
    ckpt = cm.Checkpoint(dict(sd))
    merge = cm.ops.Merge(["a", "b"], "ab")
    try:
        merge.apply(ckpt)
    except OpError:
        return
    inverse = merge.inverse()
    assert inverse is not None
    inverse.apply(ckpt)
    assert {k: tuple(v.shape) for k, v in ckpt.state_dict.items()} == {"a": (4, 2), "b": (2, 2)}


def test_a_merge_whose_sizes_are_not_its_parts_sizes_is_refused():
    ckpt = cm.Checkpoint({"a": torch.zeros(4, 2), "b": torch.ones(2, 2)})
    with pytest.raises(OpError, match=r"have sizes \[4, 2\]"):
        cm.ops.Merge(["a", "b"], "ab", sizes=[3, 3]).apply(ckpt)


@pytest.mark.parametrize("fill", [300, -1])
def test_pad_refuses_a_fill_outside_an_integer_dtypes_range(fill):
    with pytest.raises(OpError, match="fill"):
        cm.ops.Pad("w", size=8, fill=fill).transform(torch.zeros(6, dtype=torch.uint8))


def test_a_never_routed_experts_rows_start_at_zero_under_the_largest_step_and_the_history_says_so(
    tmp_path,
):
    torch.manual_seed(0)
    old = Experts()
    opt = routed_adam(old, [[0, 1, 2], [1, 2], [1, 2]])  # expert 0 trained once, 3 never
    before = state_by_name(opt.state_dict())
    with pytest.warns(cm.OptimizerStateMergedWarning, match=r"experts\.3\.weight had no state"):
        new_ckpt = upgrade_on_disk(tmp_path, old, opt, two_step_schema([STACK]))
    stacked = state_by_name(new_ckpt.optimizer)["experts.weight"]
    for fld in ("exp_avg", "exp_avg_sq"):
        for i in range(3):
            torch.testing.assert_close(stacked[fld][i], before[f"experts.{i}.weight"][fld], **TOL)
        assert bool((stacked[fld][3] == 0).all()), fld
    assert float(stacked["step"]) == 3  # experts 1 and 2's: the count a stacked tensor would have
    (merge,) = new_ckpt.history[-1]["optimizer_state_merged"]
    assert merge["key"] == "experts.weight" and merge["fresh"] == ["experts.3.weight"]
    assert merge["differing"]["step"]["experts.0.weight"] == 1 and merge["kept"]["step"] == 3
    # the migrated state loads into today's model and steps
    new = StackedExperts()
    new.load_state_dict(new_ckpt.state_dict)
    new_opt = torch.optim.Adam(new.named_parameters(), lr=0.01)
    new_opt.load_state_dict(new_ckpt.optimizer)
    new.experts.weight.sum().backward()
    new_opt.step()


def test_stacking_experts_that_share_their_state_fields_and_steps_gives_no_warning(tmp_path):
    torch.manual_seed(0)
    old = Experts()
    opt = adam_state(old)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", cm.OptimizerStateMergedWarning)
        new_ckpt = upgrade_on_disk(tmp_path, old, opt, two_step_schema([STACK]))
    assert "optimizer_state_merged" not in new_ckpt.history[-1]
