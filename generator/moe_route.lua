-- moe_route.lua - the MoE router (templates/moe_route.cu): logits -> top-k ids and weights, one
-- warp per token. Not tuned: it reads T*E*4 bytes once and is a few microseconds at every size
-- the layer runs at, so it has no axes and no problem fields (E, K and the routing mode are
-- run-time parameters).
--
-- Launch: block = warps * 32 threads, grid = ceil(T / warps), no dynamic shared memory; one
-- argument, fm_moe_route_params by value.

local WARPS = 4 -- 4 tokens per CTA: 8 KB of static shared memory for the grouped pass

return {
  name = "moe_route",
  op = "moe_route",
  template = "moe_route.cu",
  entry = "fm_moe_route",
  min_arch = 80,
  arch_suffix = "",
  warps = WARPS,

  problem = {},
  axes = {},
  constraints = {},

  name_of = function(_) return "moe_route" end,
  defines = function(_) return { FM_ROUTE_WARPS = WARPS } end,
  threads = function(_) return WARPS * 32 end,
  smem_bytes = function(_) return 0 end,
}
