-- moe_align.lua - sorts routing slots by expert into block_m-padded rows (templates/moe_align.cu).
-- One CTA for the whole problem: E <= 512 experts fit its shared-memory counters, and its two
-- passes over the T*K ids stay in the tens of microseconds at T = 16384, K = 8 (next to
-- milliseconds of GEMM). block_m is a run-time parameter, so one compiled kernel serves every
-- GEMM configuration.
--
-- Launch: ONE block of `threads` threads, no dynamic shared memory; fm_moe_align_params by value.

local THREADS = 1024

return {
  name = "moe_align",
  op = "moe_align",
  template = "moe_align.cu",
  entry = "fm_moe_align",
  min_arch = 80, -- __match_any_sync needs sm_70; the GEMMs need sm_80 anyway
  arch_suffix = "",

  problem = {},
  axes = {},
  constraints = {},

  name_of = function(_) return "moe_align" end,
  defines = function(_) return { FM_ALIGN_THREADS = THREADS } end,
  threads = function(_) return THREADS end,
  smem_bytes = function(_) return 0 end,
}
