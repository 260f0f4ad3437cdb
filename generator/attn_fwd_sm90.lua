-- attn_fwd_sm90.lua - attention forward for Hopper (templates/attn_fwd_sm90.cu): TMA + mbarrier
-- K/V ring, one producer warpgroup and 1..3 consumer warpgroups with wgmma, online softmax in
-- registers. See the template's header for the design.
--
-- Launch (runtime/attn_launch_sm90.c): arguments (tmQ, tmK, tmV, tmO, params) where the tensor maps
-- describe Q, K, V as 4-D (D, S, H, B) bf16/fp16 tensors with 128-byte swizzle and boxes of
-- {64, block_m, 1, 1} (Q) and {64, block_n, 1, 1} (K, V); grid = num_tiles blocks
-- (num_tiles = ceil(Sq / block_m) * H * B), or min(num_tiles, SMs) when persistent.

local SMEM_DEFAULT = 232448 -- H100/H200 opt-in maximum per block (227 KB), when no device given
local REGS_PER_SM = 65536

-- Tile table: the (block_m, block_n, stages, CTAs per SM) each head dim is tuned over. Every
-- consumer warpgroup holds O (D/2 floats), S (block_n/2 floats) and, with intra-warpgroup overlap,
-- P (block_n/4 words) at once; shared memory holds Q (block_m x D) plus `stages` K and V blocks.
--  d64:  per-block work is short next to copy latency, so three stages (the small K/V blocks
--        leave room). 192x128 with three consumers is FA3's shape; 128x192 trades rows for a
--        longer softmax; 128x128 halves the causal diagonal's waste of 192 rows (with five
--        stages, for short causal tiles of two or three key blocks, so that the producer runs a
--        whole tile ahead and the next head's first K/V blocks arrive from HBM in time); 64x128
--        is the one-consumer variant for short query lengths; 128x64 and 192x64 for short causal
--        rows, where the diagonal key block is half masked: with 64 keys per block a
--        warpgroup skips the diagonal half its rows never see (fm_skip_block), so causal S = 512
--        multiplies 1.12x the useful work instead of 1.25x, at twice the per-block overhead.
--  d128: 128x128 (160 KB) and 128x176 (208 KB, the most keys per block that fits two stages
--        beside Q; better for long non-causal rows); 64x128 for short query lengths.
--  d256: O alone takes 128 registers; 128x80 (224 KB) is the largest block_n that fits two
--        stages, 128x64 (192 KB) its lighter sibling; 64x64 with one consumer (block_n 80
--        already spills there, see consumer_regs).
--  Two CTAs per SM (one consumer each, 64-row tiles small enough that two fit in shared memory):
--        for short sequences, where a tile is mostly prologue (Q and first K copies), a short
--        dependent chain of products and softmax, and epilogue, one CTA leaves the tensor cores
--        idle between tiles; a second resident CTA fills those gaps (bench/NOTES.md, v4).
--        Measured on H200 over the whole grid: the d64 pair came within 4% of the best at causal
--        S = 512 (the best there is 128x128 with a second Q slot); at d128 the two-CTA tiles
--        (64x64 and 64x80) were never within 5% of the two-consumer 128x128, so they are not in
--        the table.
local TILES = {
  [64] = { { 192, 128, 3, 1 }, { 128, 192, 3, 1 }, { 128, 128, 3, 1 }, { 128, 128, 5, 1 },
           { 64, 128, 3, 1 }, { 128, 64, 5, 1 }, { 192, 64, 5, 1 },
           { 64, 128, 2, 2 }, { 64, 64, 3, 2 } },
  [128] = { { 128, 128, 2, 1 }, { 128, 176, 2, 1 }, { 64, 128, 2, 1 } },
  [256] = { { 128, 80, 2, 1 }, { 128, 64, 2, 1 }, { 64, 64, 2, 1 } },
}

local function in_table(c)
  for _, t in ipairs(TILES[c.head_dim] or {}) do
    if t[1] == c.block_m and t[2] == c.block_n and t[3] == c.stages and t[4] == c.ctas_per_sm then
      return true
    end
  end
  return false
end

local function threads(c) return 128 * (1 + c.consumer_wgs) end

-- Shared memory an SM has for its resident CTAs (228 KB on H100/H200), and what the hardware
-- reserves per CTA besides the dynamic allocation.
local SMEM_PER_SM = 233472
local SMEM_RESERVED_PER_CTA = 1024

-- The per-CTA limit this configuration must stay under: the opt-in maximum for one CTA per SM,
-- an equal share of the SM for more.
local function smem_limit(c, lim)
  local one = lim.smem_per_block or SMEM_DEFAULT
  if c.ctas_per_sm == 1 then return one end
  return math.min(one, SMEM_PER_SM // c.ctas_per_sm - SMEM_RESERVED_PER_CTA)
end

-- Is there a register split (setmaxnreg)? With several consumers, or with one consumer and two
-- CTAs per SM: the entry cap is then 65536 / 2 / 256 = 128, too few for a consumer's O and S.
local function split(c) return c.consumer_wgs > 1 or c.ctas_per_sm > 1 end

-- Registers per consumer thread under setmaxnreg: what the producer gives up, shared among the
-- consumer warpgroups, in multiples of 8, at most 240 (2 consumers: 128 * (24 + 2 * 240) =
-- 64512). With one consumer and one CTA per SM there is no split: the entry cap 65536 / 256 is
-- already 255, but ptxas spends uncapped registers freely (d256 with block_n 80 or 96 spills at
-- 255 with intra-warpgroup overlap), so the budget counted for it is 216. With two CTAs per SM
-- each CTA has half the file: 128 * (24 + 232) = 32768.
local function consumer_regs(c)
  if not split(c) then return 216 end
  local r = (REGS_PER_SM // c.ctas_per_sm // 128 - c.producer_regs) // c.consumer_wgs
  r = r - r % 8
  if r > 240 then r = 240 end
  return r
end

-- Live registers a consumer needs in its main loop (see TILES); the 32 cover row state (m, l,
-- scale), descriptors, barrier addresses, masks and loop counters. Calibrated against ptxas
-- with overlap on: d64 192x128 fits 160 and spills at 144 (need 160), d128 128x176 fits 232
-- and spills at 216 (need 228), d256 128x80 fits 224 and spills at 208 (need 220).
local function consumer_need(c)
  local n = c.head_dim // 2 + c.block_n // 2 + 32
  if c.intra_overlap == 1 then n = n + c.block_n // 4 end
  if c.q_regs == 1 then n = n + c.head_dim // 4 end
  return n
end

-- Q slots + K and V rings + mbarriers (q_full and q_empty per Q slot, o_empty, 4 per stage) +
-- 1024 bytes of slack to align the base to the 1024-byte swizzle atom (see the template).
local function smem_base(c)
  local q = c.block_m * c.head_dim * 2
  local kv = c.block_n * c.head_dim * 2
  return c.q_stages * q + 2 * c.stages * kv + 8 * (2 * c.q_stages + 1 + 4 * c.stages) + 1024
end

-- The epilogue stages O in a buffer of its own (FM_O_SEPARATE) wherever that still fits the
-- H100/H200 limit: the warpgroups then finish a tile without waiting for each other and the next
-- tile's V copies need not wait for the epilogue (with O staged in the V ring, the next tile's
-- first P V waits for a copy issued only after the epilogue: estimated at about a microsecond
-- per tile, 2% of a 32-block d128 tile at S = 4096, up to 8% at S = 1024). Fits: d64 (all tiles), d128 128x128 and
-- 64x128, d256 64x64; not d128 128x176 or d256 with two consumers. Decided on the fixed limit,
-- not the device's, so that a configuration name always means the same kernel.
local function o_separate(c)
  return smem_base(c) + c.block_m * c.head_dim * 2 <= smem_limit(c, {})
end

-- Lazy rescaling of O (see the template's fm_softmax): the rescale it saves is D/2 multiplies per
-- thread and step. Measured (bench/NOTES.md, fourteenth session, same-process A/B): every d256
-- point faster, +2.8% (H100) and +3.2% (H200) on average; d128 neutral (+0.4% / +0.6%); d64 (a
-- 32-multiply saving) between -3% and +5% in a first version, and its three-consumer tiles
-- (160 registers) spill with it. On from head dim 128.
local function lazy_rescale(c) return c.head_dim >= 128 end

local function smem_bytes(c)
  return smem_base(c) + (o_separate(c) and c.block_m * c.head_dim * 2 or 0)
end

return {
  name = "attn_fwd_sm90",
  op = "attn_fwd",
  template = "attn_fwd_sm90.cu",
  entry = "fm_attn_fwd_sm90",
  min_arch = 90,
  arch_suffix = "a",

  problem = require("attn_problem"),

  -- Simplest values first: the first kept configuration is the fallback default.
  axes = {
    { name = "block_m", values = { 64, 128, 192 } },
    { name = "block_n", values = { 64, 80, 96, 128, 176, 192 } },
    { name = "stages", values = { 2, 3, 5 } },
    { name = "consumer_wgs", values = { 1, 2, 3 } },
    { name = "pingpong", values = { 0, 1 } },
    { name = "intra_overlap", values = { 0, 1 } },
    { name = "persistent", values = { 0, 1 } },
    -- Q buffers. Two let a persistent CTA copy the next tile's Q while the current one runs
    -- (with one, that copy waits for the current tile's last S product).
    { name = "q_stages", values = { 1, 2 }, default = 1 },
    -- Resident CTAs per SM the kernel is built for (launch bounds, register split, persistent
    -- grid size).
    { name = "ctas_per_sm", values = { 1, 2 }, default = 1 },
    -- Producer registers under setmaxnreg (the consumers get the rest). 24 is the floor of
    -- setmaxnreg and enough for one thread issuing copies; 40 would leave room for a
    -- multi-thread producer.
    { name = "producer_regs", values = { 24 } },
    -- Split tail (stream-K over the last tiles, see the template): a persistent non-causal grid
    -- whose tile count is not a multiple of the CTA count shares the last one to two rounds of
    -- tiles out by key block, and the owners of the split tiles merge partial results. Needs the
    -- caller's workspace (fm_attention_workspace_size); without one it runs unsplit.
    { name = "split_tail", values = { 0, 1 }, default = 0 },
    -- Output store: 0 every consumer thread copies its rows from the staging area to global
    -- memory with 16-byte stores; 1 one thread hands them to the copy engine (TMA store) and the
    -- warpgroup starts its next tile at once. Only with a staging buffer of its own.
    { name = "tma_store", values = { 0, 1 }, default = 0 },
    -- CTAs per cluster. 2: a cluster runs tiles of 2 * block_m rows, each CTA its own block_m of
    -- them, and each CTA copies half of every K/V block, multicast into both CTAs' rings: L2 is
    -- read once per cluster. At d128 a 128x128 tile reads 64 KB of K and V from L2 per key block,
    -- about 5 TB/s over the card, and reading it twice over measured 3-10% slower under
    -- sustained load (H100, bench/NOTES.md): the card is at its power limit there.
    { name = "cluster", values = { 1, 2 }, default = 1 },
    -- Cross-tile overlap (persistent): a CTA's key blocks form one stream over its tiles; the
    -- next tile's first S product is issued with this tile's last P V and the epilogue follows
    -- (see the template). 0: each tile starts with its first S product and softmax alone and
    -- ends with its last P V alone.
    { name = "flat", values = { 0, 1 }, default = 0 },
    -- Q operand of the S products: 0 from shared memory (re-read by every product), 1 from
    -- registers, loaded once per tile (see the template's fm_consumer). Trades D/4 registers
    -- for a third less shared-memory traffic per S product.
    { name = "q_regs", values = { 0, 1 }, default = 0 },
  },

  constraints = {
    {
      reason = "block_m must be 64 * consumer_wgs: each consumer warpgroup owns one m64 wgmma tile of query rows",
      check = function(c) return c.block_m == 64 * c.consumer_wgs end,
    },
    {
      reason = "block_n must be a multiple of 16 up to 256 (wgmma N <= 256; P V steps over it in k16)",
      check = function(c) return c.block_n % 16 == 0 and c.block_n <= 256 end,
    },
    {
      reason = "the V ring (stages * block_n rows) must hold the block_m output rows the epilogue stages there",
      check = function(c) return o_separate(c) or c.stages * c.block_n >= c.block_m end,
    },
    {
      reason = function(c)
        local t = {}
        for _, e in ipairs(TILES[c.head_dim] or {}) do
          t[#t + 1] = string.format("%dx%d/s%d/x%d", e[1], e[2], e[3], e[4])
        end
        return string.format("block %dx%d with %d stages and %d CTA(s) per SM is not in the sm90 tile table for d=%d (%s)",
          c.block_m, c.block_n, c.stages, c.ctas_per_sm, c.head_dim, table.concat(t, ", "))
      end,
      check = in_table,
    },
    {
      reason = "pingpong needs at least two consumer warpgroups to alternate",
      check = function(c) return c.pingpong == 0 or c.consumer_wgs >= 2 end,
    },
    {
      reason = "persistent only with intra_overlap: the persistent loop pays off on the fully pipelined variant, and the default space stays small enough to compile in CI",
      check = function(c) return c.persistent == 0 or c.intra_overlap == 1 end,
    },
    {
      -- Measured on H200 (18 shapes, d 64/128/256, S 1k/4k/16k, causal or not): with two or
      -- three consumers, intra_overlap 0 was never within 7% of the best variant. The
      -- one-consumer serial variant stays as the simple fallback.
      reason = "intra_overlap 0 only with one consumer warpgroup (the serial fallback): measured at least 7% behind with two or three",
      check = function(c) return c.intra_overlap == 1 or c.consumer_wgs == 1 end,
    },
    {
      reason = "q_stages 2 only with a persistent grid (one tile per CTA has nothing to prefetch)",
      check = function(c) return c.q_stages == 1 or c.persistent == 1 end,
    },
    {
      reason = "two CTAs per SM only with intra-warpgroup overlap (the serial variant measured behind it at every point on H200)",
      check = function(c) return c.ctas_per_sm == 1 or c.intra_overlap == 1 end,
    },
    {
      reason = "split_tail only with a persistent, non-causal grid of one CTA per SM (it splits the last round of equal tiles; every CTA must be resident)",
      check = function(c)
        return c.split_tail == 0 or (c.persistent == 1 and c.causal == 0 and c.ctas_per_sm == 1)
      end,
    },
    {
      -- d64's 192-row tiles already read K/V for 1.5x the rows, and its speed is set by the
      -- exponentials; the variants would double the d64 space for little. The one-consumer
      -- 64-row tiles serve short query lengths, where there is little K/V to share (and d256
      -- 64x64 with a second Q slot and the split tail spills at 255 registers with it).
      reason = "cluster 2 only for a persistent, non-causal grid of one CTA per SM with two or more consumer warpgroups at head dim 128 or 256 (every CTA of a cluster walks the same key blocks)",
      check = function(c)
        return c.cluster == 1 or (c.persistent == 1 and c.causal == 0 and c.ctas_per_sm == 1 and
          c.consumer_wgs >= 2 and c.head_dim >= 128)
      end,
    },
    {
      -- With one Q slot the next tile's Q is copied only once this tile's S products are done,
      -- i.e. right at the boundary the overlap is meant to fill.
      reason = "flat only with a persistent grid and a second Q slot (q_stages 2): the next tile's Q must be in place when this tile's last P V is issued",
      check = function(c) return c.flat == 0 or (c.persistent == 1 and c.q_stages == 2) end,
    },
    {
      reason = function(c)
        return string.format("flat keeps the next tile's state and this tile's row state live besides the loop's: needs about %d registers, has %d",
          consumer_need(c) + 16, consumer_regs(c))
      end,
      check = function(c) return c.flat == 0 or consumer_need(c) + 16 <= consumer_regs(c) end,
    },
    {
      -- Seen with NVRTC 13.0: the consumer code is unchanged in size, but the register
      -- assignment moves and the producer (paired causal schedule) no longer fits 24.
      reason = "flat with block_n 64 at d64 causal: ptxas spills 4 bytes in the 24-register producer",
      check = function(c)
        return c.flat == 0 or not (c.head_dim == 64 and c.causal == 1 and c.block_n == 64)
      end,
    },
    {
      -- d256 cannot spare the 64 registers; d64 (a 16-register Q) is left out until d128 shows
      -- the trade pays (its space is already the largest).
      reason = "q_regs only at head dim 128 with two or more consumer warpgroups and intra-warpgroup overlap",
      check = function(c)
        return c.q_regs == 0 or (c.head_dim == 128 and c.consumer_wgs >= 2 and
          c.intra_overlap == 1)
      end,
    },
    {
      -- Seen with NVRTC 13.0: 6 of the 22 causal d128 variants spilled 4-16 bytes (the masked
      -- steps' extra state): those with one Q slot and ping-pong, and those with the TMA store
      -- and flat together. The second Q slot is what the causal winners use.
      reason = "q_regs at causal only with a second Q slot and not with tma_store and flat together (ptxas spills)",
      check = function(c)
        return c.q_regs == 0 or c.causal == 0 or
          (c.q_stages == 2 and not (c.tma_store == 1 and c.flat == 1))
      end,
    },
    {
      -- Seen with NVRTC 13.0: 12 of the 16 d128 split-tail variants spilled 16-32 bytes with Q in
      -- registers (the merge's extra row state), the other 4 only with clusters and no flat.
      reason = "q_regs not with split_tail: ptxas spills the split tile's merge state",
      check = function(c) return c.q_regs == 0 or c.split_tail == 0 end,
    },
    {
      reason = "tma_store only with the output staged in a buffer of its own (o_separate): in the V ring the next tile's V copies would have to wait for the store",
      check = function(c) return c.tma_store == 0 or o_separate(c) end,
    },
    {
      reason = "two CTAs per SM only with one consumer warpgroup (more would not fit the register file twice)",
      check = function(c) return c.ctas_per_sm == 1 or c.consumer_wgs == 1 end,
    },
    {
      reason = function(c)
        return string.format("register budget: a consumer needs about %d registers (O %d + S %d%s%s + 32), has %d",
          consumer_need(c), c.head_dim // 2, c.block_n // 2,
          c.intra_overlap == 1 and string.format(" + P %d", c.block_n // 4) or "",
          c.q_regs == 1 and string.format(" + Q %d", c.head_dim // 4) or "", consumer_regs(c))
      end,
      check = function(c) return consumer_need(c) <= consumer_regs(c) end,
    },
    {
      reason = function(c, lim)
        return string.format("shared memory %d bytes exceeds the per-block limit %d (%d CTA(s) per SM)",
          smem_bytes(c), smem_limit(c, lim), c.ctas_per_sm)
      end,
      check = function(c, lim) return smem_bytes(c) <= smem_limit(c, lim) end,
    },
  },

  name_of = function(c)
    -- The CTAs-per-SM suffix only where it is not 1: names in existing databases stay valid.
    return string.format("attn_fwd_sm90_%s_d%d_c%d_m%d_n%d_s%d_wg%d_pp%d_io%d_p%d_r%d%s",
      c.dtype, c.head_dim, c.causal, c.block_m, c.block_n, c.stages, c.consumer_wgs, c.pingpong,
      c.intra_overlap, c.persistent, c.producer_regs,
      c.ctas_per_sm == 1 and "" or string.format("_x%d", c.ctas_per_sm))
      .. (c.q_stages == 1 and "" or string.format("_q%d", c.q_stages))
      .. (c.split_tail == 1 and "_sk" or "")
      .. (c.tma_store == 1 and "_ts" or "")
      .. (c.cluster == 1 and "" or string.format("_cl%d", c.cluster))
      .. (c.flat == 1 and "_fl" or "")
      .. (c.q_regs == 1 and "_qr" or "")
  end,

  defines = function(c)
    local sp = split(c)
    return {
      FM_DTYPE_BF16 = c.dtype == "bf16" and 1 or 0,
      FM_HEAD_DIM = c.head_dim,
      FM_CAUSAL = c.causal,
      FM_BLOCK_M = c.block_m,
      FM_BLOCK_N = c.block_n,
      FM_STAGES = c.stages,
      FM_CONSUMER_WGS = c.consumer_wgs,
      FM_PINGPONG = c.pingpong,
      FM_INTRA_OVERLAP = c.intra_overlap,
      FM_PERSISTENT = c.persistent,
      FM_O_SEPARATE = o_separate(c) and 1 or 0,
      FM_CTAS_PER_SM = c.ctas_per_sm,
      FM_Q_STAGES = c.q_stages,
      FM_SPLIT_TAIL = c.split_tail,
      FM_TMA_STORE = c.tma_store,
      FM_CLUSTER = c.cluster,
      FM_FLAT = c.flat,
      FM_Q_REGS = c.q_regs,
      FM_LAZY_RESCALE = lazy_rescale(c) and 1 or 0,
      FM_PRODUCER_REGS = sp and c.producer_regs or 0,
      FM_CONSUMER_REGS = sp and consumer_regs(c) or 0,
    }
  end,

  threads = threads,
  smem_bytes = smem_bytes,

  -- Per-architecture default, from the H200 tuning grid (bf16, S = 1k/4k/16k): three consumers
  -- on 192x128 for d64, two on 128x128 for d128 (128x176 won only at S = 16k, by under 2%) and
  -- on 128x80 for d256; ping-pong and intra-warpgroup overlap on. Persistent where not causal
  -- (it won 8 of those 9 shapes, by up to 9% at S = 1k); causal was measured with one tile per
  -- CTA winning, before the paired persistent schedule (see the template): re-check that.
  -- The split tail where persistent (it only acts with a caller's workspace, and measured 0 to
  -- +3% at d128 on H200) and the TMA store wherever O has its own staging buffer (+3 to 5% on
  -- short causal tiles, within 1% elsewhere, H100 and H200).
  default = function(problem)
    local d, causal = problem.head_dim, problem.causal
    local c = { pingpong = 1, intra_overlap = 1, persistent = causal == 1 and 0 or 1,
      producer_regs = 24, ctas_per_sm = 1, q_stages = 1, cluster = 1, flat = 0, head_dim = d }
    if d == 64 then
      c.block_m, c.block_n, c.stages, c.consumer_wgs = 192, 128, 3, 3
    elseif d == 128 then
      c.block_m, c.block_n, c.stages, c.consumer_wgs = 128, 128, 2, 2
    else
      c.block_m, c.block_n, c.stages, c.consumer_wgs = 128, 80, 2, 2
    end
    c.split_tail = c.persistent
    c.tma_store = o_separate(c) and 1 or 0
    return c
  end,
}
