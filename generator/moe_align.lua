-- moe_align.lua - sorts routing slots by expert into block_m-padded rows (templates/moe_align.cu).
-- Two kernels (count with the last CTA scanning, then place), each CTA taking threads x
-- FM_MOE_ALIGN_PER_THREAD slots: the work per CTA stays bounded as T grows (one CTA for the
-- whole problem took 0.36 ms at T = 16384, K = 8 on an H100). block_m is a run-time parameter,
-- so one compiled module serves every GEMM configuration.
--
-- Launch (runtime/moe.c): grid ceil(T*K / (threads * FM_MOE_ALIGN_PER_THREAD)) blocks of
-- `threads` for fm_moe_align, then the same for fm_moe_align_place; no dynamic shared memory;
-- fm_moe_align_params by value; the expert counts and the ticket zeroed before.

local THREADS = 256

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
