-- attn_problem.lua - what an attention-forward call fixes, shared by every attention family (and
-- the reference) so that the default space is declared once: dtype, head dim, causality.
-- runtime/attention.c validates calls against the same values.
return {
  { name = "dtype", values = { "bf16", "fp16" } },
  { name = "head_dim", values = { 64, 128, 256 } },
  { name = "causal", values = { 0, 1 } },
}
