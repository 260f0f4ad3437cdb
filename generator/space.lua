-- space.lua - the shared half of the generator: enumerate a family's space, cull with reasons,
-- name configurations and render them into compilable CUDA C.
--
-- A family module (generator/<family>.lua) returns a table:
--   name        family name, e.g. "attn_fwd_sm80"
--   op          operation it implements, e.g. "attn_fwd"
--   template    file under templates/ holding the kernel
--   entry       extern "C" kernel symbol (string, or function(config) -> string)
--   min_arch    lowest compute capability (80, 90)
--   arch_suffix "a" when the code needs sm_90a-only instructions (wgmma, setmaxnreg), else ""
--   problem     ordered list of {name=, values={...}}: what the caller's problem fixes (dtype,
--               head dim, causal, ...). The default space is the product of these values.
--   axes        ordered list of {name=, values={...}}: the tuning axes (an axis added after
--               configurations were stored also gives default=, their implicit value)
--   constraints list of {reason=string or function(c, lim) -> string, check=function(c, lim) -> bool}
--               check returns true when the configuration is acceptable
--   name_of     function(c) -> canonical name (must spell every problem and axis value)
--   defines     function(c) -> table of macro name -> value, prepended to the template
--   threads     function(c) -> threads per block
--   smem_bytes  function(c) -> dynamic shared memory bytes
--
-- `lim` (the device limits) has fields arch, smem_per_block, regs_per_sm.
-- The C side provides the global fm_read_template(path) -> string or nil, err.

local space = {}

local function copy(t)
  local r = {}
  for k, v in pairs(t) do r[k] = v end
  return r
end

-- Calls fn(config) for every point of the product of `lists` (ordered {name, values}), starting
-- from the fields of `base`.
local function product(lists, base, fn)
  local n = #lists
  local function rec(i, cur)
    if i > n then return fn(copy(cur)) end
    local ax = lists[i]
    for _, v in ipairs(ax.values) do
      cur[ax.name] = v
      if rec(i + 1, cur) then return true end
    end
    cur[ax.name] = nil
  end
  rec(1, copy(base or {}))
end

-- The first failing constraint's reason, or nil when every constraint holds.
function space.check(F, c, lim)
  if lim and lim.arch and lim.arch < F.min_arch then
    return string.format("needs compute capability %d.%d, device has %d.%d",
      F.min_arch // 10, F.min_arch % 10, lim.arch // 10, lim.arch % 10)
  end
  for _, k in ipairs(F.constraints or {}) do
    local ok = k.check(c, lim or {})
    if not ok then
      local r = k.reason
      if type(r) == "function" then r = r(c, lim or {}) end
      return r
    end
  end
  return nil
end

-- Enumerates F's tuning space for one problem (a table with the problem fields set).
-- Calls emit(config, reason) with reason nil for kept configurations. emit returning true stops.
function space.enumerate(F, problem, lim, emit)
  for _, p in ipairs(F.problem) do
    if problem[p.name] == nil then
      error(string.format("%s: problem field '%s' missing", F.name, p.name))
    end
  end
  product(F.axes, problem, function(c)
    c.family = F.name
    c.name = F.name_of(c)
    return emit(c, space.check(F, c, lim))
  end)
end

-- Every problem of the family's default space.
function space.problems(F, emit)
  product(F.problem, {}, function(p)
    p.family = F.name
    return emit(p)
  end)
end

-- FNV-1a 64-bit over a string, as 16 hex digits (used to key caches on template content).
function space.hash(s)
  local h = 0xcbf29ce484222325
  for i = 1, #s do
    h = h ~ s:byte(i)
    h = h * 0x100000001b3
  end
  return string.format("%016x", h)
end

-- Reads a template and inlines its quoted includes (each file once, as #pragma once would), so
-- that NVRTC gets one self-contained source and the hash covers everything it compiles.
local function expand(path, seen, out)
  if seen[path] then return end
  seen[path] = true
  local text, err = fm_read_template(path)
  if not text then error("template " .. path .. ": " .. tostring(err)) end
  local dir = path:match("^(.*/)") or ""
  out[#out + 1] = string.format("#line 1 \"%s\"\n", path)
  local lineno = 0
  for line in (text .. (text:sub(-1) == "\n" and "" or "\n")):gmatch("([^\n]*)\n") do
    lineno = lineno + 1
    local inc = line:match('^%s*#%s*include%s+"([^"]+)"')
    if inc then
      local target = inc
      if not target:find("/") or target:match("^%.%./") then target = dir .. inc end
      target = target:gsub("[^/]+/%.%./", "")
      expand(target, seen, out)
      out[#out + 1] = string.format("#line %d \"%s\"\n", lineno + 1, path)
    elseif line:match("^%s*#%s*pragma%s+once") then
      out[#out + 1] = "\n"
    else
      out[#out + 1] = line .. "\n"
    end
  end
end

-- Renders configuration c of family F: returns a table {source, entry, threads, smem_bytes,
-- template_hash, arch_suffix, min_arch, launch}. launch: integers the host needs to launch the
-- kernel that are derived from c (F.launch(c); e.g. a limit the kernel is compiled with and the
-- host must pass on to another kernel), so that the family states them once.
function space.render(F, c)
  local parts = {}
  expand(F.template, {}, parts)
  local body = table.concat(parts)
  local defs = F.defines(c)
  local keys = {}
  for k in pairs(defs) do keys[#keys + 1] = k end
  table.sort(keys)
  local pre = { string.format("// flashmoe %s\n#define FM_CONFIG_NAME \"%s\"\n", c.name, c.name) }
  for _, k in ipairs(keys) do
    local v = defs[k]
    if type(v) == "boolean" then v = v and 1 or 0 end
    pre[#pre + 1] = string.format("#define %s %s\n", k, tostring(v))
  end
  local entry = F.entry
  if type(entry) == "function" then entry = entry(c) end
  return {
    source = table.concat(pre) .. body,
    entry = entry,
    threads = F.threads(c),
    smem_bytes = F.smem_bytes(c),
    template_hash = space.hash(body),
    arch_suffix = F.arch_suffix or "",
    min_arch = F.min_arch,
    launch = F.launch and F.launch(c) or {},
  }
end

-- ---- entry points used by the C side (runtime/generator.c) ---------------------------------
-- Configurations cross into C as a name plus an ordered list of {key, value}: problem fields in
-- declared order, then the axes in declared order, so parameter strings are canonical.

local function family(name)
  local ok, F = pcall(require, name)
  if not ok then error("unknown kernel family '" .. name .. "': " .. tostring(F), 0) end
  return F
end

function space.flatten(F, c)
  local out = {}
  for _, p in ipairs(F.problem) do out[#out + 1] = { p.name, c[p.name] } end
  for _, a in ipairs(F.axes) do out[#out + 1] = { a.name, c[a.name] } end
  return out
end

local function from_params(F, params)
  local c = { family = F.name }
  for k, v in pairs(params) do c[k] = v end
  for _, p in ipairs(F.problem) do
    if c[p.name] == nil then error(F.name .. ": parameter '" .. p.name .. "' missing", 0) end
  end
  -- An axis added after configurations were stored declares `default`, the value those
  -- configurations had implicitly (their names do not mention it): they stay loadable.
  for _, a in ipairs(F.axes) do
    if c[a.name] == nil and a.default ~= nil then c[a.name] = a.default end
    if c[a.name] == nil then error(F.name .. ": parameter '" .. a.name .. "' missing", 0) end
  end
  c.name = F.name_of(c)
  return c
end

function space.c_enumerate(fname, problem, lim, emit)
  local F = family(fname)
  space.enumerate(F, problem, lim, function(c, reason)
    return emit(c.name, space.flatten(F, c), reason)
  end)
end

function space.c_problems(fname, emit)
  local F = family(fname)
  space.problems(F, function(p)
    local flat = {}
    for _, d in ipairs(F.problem) do flat[#flat + 1] = { d.name, p[d.name] } end
    return emit(F.name, flat, nil)
  end)
end

function space.c_name(fname, params)
  local F = family(fname)
  return from_params(F, params).name
end

function space.c_render(fname, params)
  local F = family(fname)
  local c = from_params(F, params)
  local why = space.check(F, c, nil)
  if why then error(c.name .. " violates a constraint: " .. why, 0) end
  return space.render(F, c)
end

-- The default configuration of `op` for a problem on a device: among the families for the op
-- that the device supports, the one with the highest min_arch; its `default(problem, lim)` if it
-- has one and that configuration is acceptable, else its first acceptable configuration.
function space.c_default(op, names, problem, lim, emit)
  local fams = {}
  for _, n in ipairs(names) do
    local F = family(n)
    if F.name and F.op == op and (not lim or F.min_arch <= lim.arch) then fams[#fams + 1] = F end
  end
  table.sort(fams, function(a, b) return a.min_arch > b.min_arch end)
  -- The newest family the device supports wins, unless its constraints leave nothing for this
  -- problem on this device (an sm_90a family on sm_100): then the next one.
  for _, F in ipairs(fams) do
    if F.default then
      local c = F.default(problem, lim or {})
      if c then
        for k, v in pairs(problem) do c[k] = v end
        c.family = F.name
        c.name = F.name_of(c)
        if not space.check(F, c, lim) then return emit(c.name, space.flatten(F, c), nil, F.name) end
      end
    end
    local chosen
    space.enumerate(F, problem, lim, function(c, reason)
      if not reason then chosen = c; return true end
    end)
    if chosen then return emit(chosen.name, space.flatten(F, chosen), nil, F.name) end
  end
  error("no kernel family implements " .. op .. " for this problem on this device", 0)
end

-- Families implementing `op` (nil: all), sorted by name.
function space.c_families(op, names)
  local out = {}
  for _, n in ipairs(names) do
    local F = family(n)
    -- shared data modules (attn_problem) sit beside the families: only tables with a name count
    if F.name and (op == nil or F.op == op) then out[#out + 1] = F.name end
  end
  table.sort(out)
  return table.concat(out, ",")
end

return space
