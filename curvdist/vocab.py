"""The words of curvdist, written once: layer types, model types, output columns, statuses, layer patterns.

No torch, no Ray, no IO: every layer (math, runner, io, interfaces) imports its vocabulary from here.

    vocab.matches("model.layers.3.mlp.up_proj", ["model.layers.*.mlp.*"])   # True
    vocab.Status.TOO_FEW_VALID.with_reason("n_valid=2 < 3")                   # "too_few_valid: n_valid=2 < 3"
    vocab.status_code("factor_too_large: C_A is 4096×4096 …")                 # Status.FACTOR_TOO_LARGE
"""
from __future__ import annotations

import enum
import fnmatch
from collections.abc import Iterable

# ------------------------------------------------------------------------------------------------ layer types
# SPEC §1 "Layer types", in the canonical order of tables and plots.
LAYER_TYPES = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out", "mlp_up", "mlp_gate", "mlp_down", "conv",
               "embedding", "head", "other")

# ------------------------------------------------------------------------------------------------ model types
# Hugging Face ``model_type`` → family.  Llama-like decoders share the Llama module names.
MODEL_TYPES = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "smollm": "llama",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "bert": "bert", "roberta": "bert", "xlm-roberta": "bert",
    # convolutional and plain networks with a Hugging Face config: classified structurally (conv / head / other)
    "resnet": "cnn", "reference_mlp": "mlp",
}
# model types a pipeline stage can be built from (curvdist.io.slice): the Ray runner's models
LLAMA_STAGE_TYPES = ("llama", "mistral", "qwen2", "qwen3")
STAGE_MODEL_TYPES = LLAMA_STAGE_TYPES + ("gpt2", "gpt_neox", "bert")
BERT_STAGE_CLASSES = ("BertModel", "BertForSequenceClassification", "BertForTokenClassification", "BertForMaskedLM")
STAGE_MODELS_TEXT = ("Llama-like decoders (model_type llama, mistral, qwen2, qwen3), GPT-2 (gpt2), GPT-NeoX "
                     "(gpt_neox) and BERT (bert), as *ForCausalLM/*LMHeadModel or the base *Model")

# ------------------------------------------------------------------------------------------------ columns
# one row per (layer, k) of the ``directions`` table, in order (the store's schema adds run_id, schema_version)
DIRECTION_COLUMNS = ("layer", "k", "sigma", "h", "h_gn", "h_kron", "h_sop", "rayleigh_delta", "rayleigh_A",
                     "lambda_delta", "lambda_A", "rho_delta", "rho_A", "phi", "Lambda", "chi", "stability",
                     "kron_floor_ratio",
                     "h_se", "h_gn_se")   # standard errors of h, h^GN from a subsample of micro-batches
# the layer's gradient signal and noise (curvdist.math.noise), columns of the ``layers`` table
NOISE_COLUMNS = ("n_units", "grad_mean_sq", "grad_trace_cov", "grad_snr", "noise_scale", "stable_directions",
                 "alpha_half_a", "alpha_half_b")
# exact h from a subsample of the micro-batches (curvdist.math.subsample), columns of the ``layers`` table: how many
# micro-batches were measured, and the per-micro-batch relative SD of h (median over k), the planner's input
EXACT_SUBSET_COLUMNS = ("exact_units", "h_unit_rel_sd")
# A layer type whose median grad_snr is below this is flagged by summaries: there E‖G‖² is at most twice its noise
# part tr Σ / U, i.e. at least half of ‖G‖²_F is expected sampling noise (grad_snr ≈ 1: pure noise).  grad_snr sees
# all m·n entries; stable_directions says whether the leading directions, which α is fitted on, are reproduced.
GRAD_SNR_FLOOR = 2.0
# one row per (layer, factor, k) of the ``spectra`` table: factor_mode says how the factor was held (dense or
# sketch, curvdist.math.modes), eigenvalue_err the error estimate of a sketched factor's λ_k (null when dense)
SPECTRA_COLUMNS = ("layer", "factor", "k", "eigenvalue", "factor_mode", "eigenvalue_err")
# columns of the ``layers`` table on the factors: the mode of C_A and C_δ (dense, sketch, null: not measured) and
# the worst relative error estimate max_k err_k / λ_k of a sketched factor's eigenvalues
FACTOR_COLUMNS = ("factor_mode_A", "factor_mode_delta", "lambda_rel_err_A", "lambda_rel_err_delta")


# ------------------------------------------------------------------------------------------------ statuses
class Status(str, enum.Enum):
    """Why a layer's numbers are (partly) missing.  A status column holds ``"<code>: <reason>"`` (or ``"ok"``);
    code by :func:`status_code`, never by string prefixes."""

    OK = "ok"
    TOP_K_EXCEEDS_RANK = "top_k_exceeds_rank"      # written by versions that voided layers with min(m, n) < K
    NON_FINITE_GRADIENT = "non_finite_gradient"    # G has NaN/Inf: nothing is fitted
    ZERO_GRADIENT = "zero_gradient"                # G == 0: the layer does not reach the loss on this batch
    NO_ERROR_ROWS = "no_error_rows"                # the layer's output never received a gradient
    FACTOR_TOO_LARGE = "factor_too_large"          # a factor (dense or sketch) over budget: β and φ are null
    NO_DIRECTIONS = "no_directions"                # nothing to fit
    NO_GRADIENT = "no_gradient"                    # no singular values given to the fit
    TOO_FEW_VALID = "too_few_valid"                # fewer than 3 directions with h > 0 and σ > 0
    DEGENERATE_SIGMA = "degenerate_sigma"          # all valid σ equal: no slope
    TOO_FEW_VALID_KRON = "too_few_valid_kron"      # fewer than 3 directions with h^Kron > 0: no α_Kron, β, φ
    DECOMPOSITION_SUBSET = "decomposition_subset"  # β, φ fitted on fewer directions than α_Kron

    def with_reason(self, reason: str) -> str:
        return self.value if self is Status.OK else f"{self.value}: {reason}"


# statuses that void every exponent of the layer (a factor over budget only voids β and φ); a layer with
# min(m, n) < K is fitted on its min(m, n) directions (n_valid says how many)
VOIDING = frozenset({Status.TOP_K_EXCEEDS_RANK, Status.NON_FINITE_GRADIENT, Status.ZERO_GRADIENT})
# statuses after which a layer has no directions at all
NO_DIRECTION_STATUSES = frozenset({Status.NON_FINITE_GRADIENT, Status.ZERO_GRADIENT})


def status_code(status: str | None) -> Status:
    """The :class:`Status` of a status string (the part before the first ``:``; several reasons joined by ``;``
    give the first one's code)."""
    if status is None or status == "":
        return Status.OK
    return Status(status.split(";", 1)[0].split(":", 1)[0].strip())


# ------------------------------------------------------------------------------------------------ layer patterns
def matches(name: str, patterns: Iterable[str] | None) -> bool:
    """Whether module ``name`` is selected by ``patterns``: exact names or ``fnmatch`` globs (``*`` also crosses
    dots: ``model.layers.*.mlp.*``), case-sensitive; None selects everything."""
    if patterns is None:
        return True
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def select(names: Iterable[str], patterns: Iterable[str] | None, *, what: str = "layers") -> list[str]:
    """``names`` (in order) selected by ``patterns``; a pattern that selects none of them is a ValueError naming
    it and some valid names (a typo would otherwise silently analyse nothing)."""
    names = list(names)
    if patterns is None:
        return names
    for p in patterns:
        if not any(matches(n, [p]) for n in names):
            some = ", ".join(names[:4])
            raise ValueError(f"{what}: pattern {p!r} matches none of {len(names)} layers (names look like {some} "
                             f"…); fix the pattern (a glob such as '{glob_example(names)}') or use null for all")
    return [n for n in names if matches(n, patterns)]


def glob_example(names: list[str]) -> str:
    block = next((n for n in names if ".0." in n), names[0] if names else "*")
    return block.split(".0.")[0] + ".0.*" if ".0." in block else block
