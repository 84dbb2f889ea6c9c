"""benchmarks/fsdp2_communication.py: what MoFaSGD communicates under FSDP2 equals the formula, call by call.

Two gloo processes step a tiny LLaMA layer; the collectives the optimizer issued in clip_grad_norm_ + step
(booked by wrapping torch.distributed, audited with torch.profiler) must equal the formula exactly.
"""

from __future__ import annotations

import pytest

from benchmarks import fsdp2_communication as comm

pytestmark = pytest.mark.distributed
HIDDEN, INTERMEDIATE, KV, RANK = 64, 160, 16, 4


@pytest.fixture(scope="module")
def measured():
    return comm.measure(HIDDEN, INTERMEDIATE, KV, RANK, steps=3, tokens=8)


def closed_form_bytes(nesterov: bool) -> int:
    """Per step: 4 (n r + 1) + 8 r^2 + 4 (1 + 8 r^2) [+ 8 r^2] bytes per matrix, plus the norm's 8-byte scalar."""
    shapes = comm.layer_matrix_shapes(HIDDEN, INTERMEDIATE, KV)
    r = RANK
    per_matrix = [4 * (n * r + 1) + 8 * r * r + 4 * (1 + 8 * r * r) + nesterov * 8 * r * r for _, n in shapes]
    return sum(per_matrix) + 8


def test_measured_collectives_equal_the_formula_call_by_call(measured):
    assert comm.check(measured, HIDDEN, INTERMEDIATE, KV, RANK) == []
    for rank in (0, 1):
        for method, nesterov in (("mofasgd", False), ("mofasgd_nesterov", True)):
            for record in measured[rank][method][1:]:
                assert comm.ledger_bytes(comm.optimizer_ledger(record)) == closed_form_bytes(nesterov)
            first = measured[rank][method][0]
            one_off = comm.first_step_gather_bytes(comm.layer_matrix_shapes(HIDDEN, INTERMEDIATE, KV))
            audited = comm.gloo_bytes(first["clip"][1]) + comm.gloo_bytes(first["step"][1])
            assert audited == closed_form_bytes(nesterov) + one_off


def test_a_zero_gradient_gathers_only_its_own_panel_and_adamw_steps_silently(measured):
    record = measured[0]["mofasgd_zero_grad_v"][1]
    gathers = {k: v for k, v in comm.optimizer_ledger(record).items() if k[1] == "all_gather"}
    assert gathers == {("cholesky_qr2", "all_gather", "float32", (KV, HIDDEN)): [1, KV * 2 * RANK]}  # v, not k
    adamw = measured[0]["adamw"][1]
    assert adamw["step"] == ({}, {})
    assert adamw["forward_backward"][1] == measured[0]["mofasgd"][1]["forward_backward"][1]


def test_the_check_fails_when_the_formula_is_wrong(measured):
    assert comm.check(measured, HIDDEN, INTERMEDIATE, KV, RANK + 1)
    wrong = {r: {m: steps for m, steps in per.items()} for r, per in measured.items()}
    wrong[1]["mofasgd"] = [dict(record) for record in measured[1]["mofasgd"]]
    step = wrong[1]["mofasgd"][2]
    ledger = {key: [calls, numbers + (key[0] == "grad_norm")] for key, (calls, numbers) in step["clip"][0].items()}
    step["clip"] = (ledger, step["clip"][1])
    problems = comm.check(wrong, HIDDEN, INTERMEDIATE, KV, RANK)
    assert len(problems) == 2 and all(p.startswith("rank 1, mofasgd, step 3") for p in problems)
