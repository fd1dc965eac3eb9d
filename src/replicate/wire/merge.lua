local U64_MAX = '18446744073709551615'
local TOTAL = '~total'

-- Decimal arithmetic on canonical strings (no sign, no leading zeros): totals exceed 2^53
-- and Lua numbers are doubles. It works on limbs of up to 15 digits, read with `tonumber`: a
-- limb is below 10^15, the sum of two limbs and a carry below 2 * 10^15 + 1, a difference
-- above -10^15, all integers below 2^53, which doubles hold exactly; '%.0f' prints an
-- integral double exactly ('%015.0f' with the zeros of an inner limb). So operands of at most
-- 15 digits (every total below $1 000 000 in nano-dollars) cost one `tonumber` each, a u64
-- two limbs. Decision: limbs rather than digits cut the script's Redis CPU by about a third
-- at 15 digits (issue 11).
local LIMB = 15
local BASE = 1e15

-- The limbs of a, least significant first.
local function limbs(a)
  local out, i = {}, #a
  while i > 0 do
    local j = i - LIMB + 1
    if j < 1 then j = 1 end
    out[#out + 1] = tonumber(string.sub(a, j, i))
    i = j - 1
  end
  return out
end

-- The canonical decimal of limbs (least significant first), leading zero limbs dropped.
local function join(l)
  local n = #l
  while n > 1 and l[n] == 0 do n = n - 1 end
  local parts = {string.format('%.0f', l[n])}
  for k = n - 1, 1, -1 do parts[#parts + 1] = string.format('%015.0f', l[k]) end
  return table.concat(parts)
end

-- a > b.
local function greater(a, b)
  if #a ~= #b then return #a > #b end
  if #a <= LIMB then return tonumber(a) > tonumber(b) end
  for i = 1, #a do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x > y end
  end
  return false
end

-- true when s is a canonical decimal (any length): the form of the running total.
local function decimal(s)
  return s == '0' or string.find(s, '^[1-9][0-9]*$') ~= nil
end

-- true when s is a u64 written canonically, the only form this protocol stores per field.
local function canonical(s)
  if not decimal(s) then return false end
  return #s < 20 or not greater(s, U64_MAX)
end

-- a + b, exact.
local function add(a, b)
  if a == '0' then return b end
  if b == '0' then return a end
  if #a <= LIMB and #b <= LIMB then
    return string.format('%.0f', tonumber(a) + tonumber(b))
  end
  local x, y, out, carry = limbs(a), limbs(b), {}, 0
  for k = 1, math.max(#x, #y) do
    local v = (x[k] or 0) + (y[k] or 0) + carry
    if v >= BASE then carry = 1; v = v - BASE else carry = 0 end
    out[k] = v
  end
  if carry > 0 then out[#out + 1] = carry end
  return join(out)
end

-- a - b for a >= b, exact.
local function sub(a, b)
  if b == '0' then return a end
  if #a <= LIMB then
    return string.format('%.0f', tonumber(a) - tonumber(b))
  end
  local x, y, out, borrow = limbs(a), limbs(b), {}, 0
  for k = 1, #x do
    local v = x[k] - (y[k] or 0) - borrow
    if v < 0 then borrow = 1; v = v + BASE else borrow = 0 end
    out[k] = v
  end
  return join(out)
end

-- total + plus - minus, exact; nil when that is below zero. One conversion of each and one
-- format when all three have at most 15 digits (the sum of two is below 2^53).
local function moved(total, plus, minus)
  if #total <= LIMB and #plus <= LIMB and #minus <= LIMB then
    local v = tonumber(total) + tonumber(plus) - tonumber(minus)
    if v < 0 then return nil end
    return string.format('%.0f', v)
  end
  local raised = add(total, plus)
  if greater(minus, raised) then return nil end
  return sub(raised, minus)
end

-- A field that holds a contribution: a node id, or a total kept apart under an instance.
local function counts(field)
  local c = string.sub(field, 1, 1)
  return c ~= '~' or string.sub(field, 1, 9) == '~retired:'
end

local function message(e)
  if type(e) == 'table' and e.err then return e.err end
  return tostring(e)
end

-- The total from the fields themselves (O(fields), only when the kept one cannot be right).
-- Fields that are not canonical u64 totals are left out; `bad` gets their count and the
-- first three `field, value` pairs. While a key holds such fields, `~bad` marks it so that
-- every touch recomputes (a field fixed by an operator is counted at once).
local function recompute(key, bad, had_bad)
  local all = redis.call('HGETALL', key)
  local sum, count = '0', 0
  for i = 1, #all, 2 do
    local f, v = all[i], all[i + 1]
    if counts(f) then
      if canonical(v) then
        sum = add(sum, v)
      else
        count = count + 1
        if count <= 3 then bad[#bad + 1] = f; bad[#bad + 1] = v end
      end
    end
  end
  if #all > 0 then redis.call('HSET', key, TOTAL, sum) end
  if count > 0 then
    redis.call('HSET', key, '~bad', tostring(count))
    table.insert(bad, 1, tostring(count))
  elseif had_bad then
    redis.call('HDEL', key, '~bad')
  end
  return sum
end

-- max(0, a - b) on canonical decimals.
local function over(a, b)
  if greater(a, b) then return sub(a, b) end
  return '0'
end

-- field := field + plus - minus for a running decimal field; false when it would go below
-- zero or the field is not a decimal (the caller recomputes).
local function shift(key, field, value, plus, minus)
  if plus == minus then return value end
  if not value or not decimal(value) then return false end
  local raised = add(value, plus)
  if greater(minus, raised) then return false end
  local v = sub(raised, minus)
  redis.call('HSET', key, field, v)
  return v
end

-- The grant fields recomputed from the fields (O(fields); only when a running one is missing
-- or damaged): `~granted` = sum of grants, `~unspent` = sum of max(0, grant - spent),
-- `~holders` = number of grant fields.
local function recompute_grants(key)
  local all = redis.call('HGETALL', key)
  local values = {}
  for i = 1, #all, 2 do values[all[i]] = all[i + 1] end
  local granted, unspent, holders = '0', '0', 0
  for f, v in pairs(values) do
    if string.sub(f, 1, 7) == '~grant:' and canonical(v) then
      local spent = values[string.sub(f, 8)]
      if not (spent and canonical(spent)) then spent = '0' end
      granted = add(granted, v)
      unspent = add(unspent, over(v, spent))
      holders = holders + 1
    end
  end
  redis.call('HSET', key, '~granted', granted, '~unspent', unspent, '~holders', tostring(holders))
  return granted, unspent, tostring(holders)
end

-- What one raise may take of `free` (a decimal) for a budget of `limit`: 1/2 of it while more
-- than half the limit is free, then 1/max(4, holders + 1), never less than 5 % of the limit,
-- and all of it once it is at most 5 % of the limit (the last dollars are not stranded), and
-- never less than 1: amounts are integers of the budget's unit, and a count budget's slice of
-- a small limit (10 concurrent slots over 4 holders: 3 / 4) would round down to a raise of 0
-- that starves the asker forever. Sized in doubles; the caller clamps it to `free` exactly.
local function step(free, limit, holders)
  local f, l = tonumber(free), tonumber(limit)
  local floor = 0.05 * l
  if f <= floor then return free end
  local k = 2
  if f <= 0.5 * l then k = math.max(4, (tonumber(holders) or 0) + 1) end
  local x = math.max(f / k, floor, 1)
  local s = string.format('%.0f', math.floor(x))
  if not decimal(s) or greater(s, free) then return free end
  return s
end

-- What is free for a raise: limit - total - unspent, where our own unused grant counts at
-- `target` (a rebuilt grant) instead of the `g` that `unspent` holds.
local function free_after(limit, total, unspent, g, target, spent)
  local used = add(add(total, unspent), over(target, spent))
  local ours = over(g, spent)
  if greater(ours, used) then return limit end
  return over(limit, sub(used, ours))
end

-- Since when the key's strict callers were heard without a gap (with `grant_lease` only):
-- `~last` is the Redis time of the last strict call by any node, `~since` the start of the
-- current run of calls. Every live node calls at every sync interval and the lease is at
-- least three, so a silence longer than half the lease means Redis (or the whole fleet) was
-- away: the run restarts, and nobody is thought dead before a full lease after it (else the
-- first node back after any outage longer than the lease would reclaim every live node's
-- grant, slots it still holds included).
local function heard(key, now_ms, lease_ms)
  local v = redis.call('HMGET', key, '~last', '~since')
  local last, since = tonumber(v[1]), tonumber(v[2])
  if not last or not since or now_ms - last > lease_ms / 2 then
    since = now_ms
    redis.call('HSET', key, '~since', tostring(since))
  end
  redis.call('HSET', key, '~last', tostring(now_ms))
  return since
end

-- Reclaims the unused grant of every other node not seen for `lease_ms` (grant lowered to
-- its spend), counting from `since` at the earliest (`heard`). Returns the amount reclaimed.
local function reclaim(key, now_ms, lease_ms, since)
  local all = redis.call('HGETALL', key)
  local values = {}
  for i = 1, #all, 2 do values[all[i]] = all[i + 1] end
  local back = '0'
  for f, v in pairs(values) do
    if string.sub(f, 1, 6) == '~seen:' and f ~= '~seen:' .. ARGV[1] then
      local n = string.sub(f, 7)
      local seen = tonumber(v) or 0
      local g = values['~grant:' .. n]
      if now_ms - math.max(seen, since) > lease_ms and g and canonical(g) then
        local spent = values[n]
        if not (spent and canonical(spent)) then spent = '0' end
        local unused = over(g, spent)
        if unused ~= '0' then
          redis.call('HSET', key, '~grant:' .. n, spent)
          back = add(back, unused)
        end
      end
    end
  end
  return back
end

local node, inst, lease_ms, release, verify = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local guard_ms, grant_lease_ms = tonumber(ARGV[6]) or 0, tonumber(ARGV[7]) or 0
-- '0': the lease we hold needs no renewal this round (the caller set it recently enough).
local renew = ARGV[8]
local grant_field = '~grant:' .. node
local now_ms = nil
local frozen = nil
local owner_field = '~owner:' .. node
local retired_mine = '~retired:' .. node .. ':' .. inst

-- Whether `id` is in the comma-separated list `list`.
local function listed(list, id)
  return list ~= '' and string.find(',' .. list .. ',', ',' .. id .. ',', 1, true) ~= nil
end

-- With `grant_lease`: holders still awaited a lease after they were first awaited are taken
-- for dead, as the lease takes a silent node everywhere else: their grant field is written at
-- 0 (their spend was lost with the data: a holder that does come back re-registers its durable
-- grant by max, the lease's documented cost) and raises resume. Without it a dead holder would
-- freeze the window until it ends: 100 years for a `concurrent` budget. Returns whether it
-- released them (the caller recomputes the running fields).
local function release_awaited(key, missing)
  if grant_lease_ms <= 0 then return false end
  local t0 = tonumber(redis.call('HGET', key, '~await_since') or '')
  if not t0 then
    redis.call('HSET', key, '~await_since', tostring(now_ms))
    return false
  end
  if now_ms - t0 <= grant_lease_ms then return false end
  for _, id in ipairs(missing) do
    redis.call('HSET', key, '~grant:' .. id, '0', '~seen:' .. id, tostring(t0))
  end
  redis.call('HDEL', key, '~await', '~await_since')
  return true
end

-- The holder registry after a data loss (issue 19). `known` is the caller's durable list of
-- the nodes it saw holding a grant field in this window; `~await` the nodes some caller knew
-- of whose field is missing. Every id of both (but the caller, registering now) without a
-- `~grant:` field is awaited: raises stay frozen until each has re-registered (or an operator
-- wrote its field). Cheap when nothing is missing: the check runs only when `~await` exists,
-- the caller's list and `~holders` disagree in size, or the caller knows itself as a holder
-- but its field was gone.
local function awaiting(key, known, holders, mine_gone)
  local aw = redis.call('HGET', key, '~await')
  local n = 0
  for _ in string.gmatch(known, '[^,]+') do n = n + 1 end
  if not aw and n == tonumber(holders) and not mine_gone then return false, false end
  local ids = {}
  for id in string.gmatch(known .. ',' .. (aw or ''), '[^,]+') do ids[id] = true end
  ids[node] = nil
  local missing = {}
  for id in pairs(ids) do
    if redis.call('HEXISTS', key, '~grant:' .. id) == 0 then missing[#missing + 1] = id end
  end
  if #missing > 0 then
    if release_awaited(key, missing) then return false, true end
    table.sort(missing)
    redis.call('HSET', key, '~await', table.concat(missing, ','))
    return true, false
  end
  if aw then redis.call('HDEL', key, '~await', '~await_since') end
  return false, false
end

-- The node ids holding a grant field, comma-separated (O(fields); only when the caller's
-- list is not the same size as `~holders`).
local function holder_ids(key)
  local out = {}
  for _, f in ipairs(redis.call('HKEYS', key)) do
    if string.sub(f, 1, 7) == '~grant:' then out[#out + 1] = string.sub(f, 8) end
  end
  table.sort(out)
  return table.concat(out, ',')
end

local lease
local read, holder = pcall(redis.call, 'GET', KEYS[1])
if not read then
  lease = {'broken', message(holder)}
elseif holder and holder ~= inst then
  lease = {'refused', holder}
else
  -- A string, not a table: every table of the reply costs Redis to convert (issue 11).
  lease = 'held'
end
local writable = lease == 'held'

-- Whether grants may be raised now: not within `guard_ms` of the budget's strict marker
-- (re)creation, i.e. of the first strict call after Redis lost its data (or ever).
local function raise_frozen()
  if frozen ~= nil then return frozen end
  local t = redis.call('TIME')
  now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local born = tonumber(redis.call('GET', KEYS[2]) or '')
  if not born then
    redis.call('SET', KEYS[2], tostring(now_ms))
    born = now_ms
  end
  frozen = now_ms < born + guard_ms
  return frozen
end

local function merge(key, own, expire_at, limit, dgrant, want, known)
  known = known or ''
  local got = redis.call('HMGET', key, node, owner_field, retired_mine, TOTAL, '~bad', grant_field)
  local cur, owner, mine, total, had_bad = got[1], got[2], got[3], got[4], got[5]
  -- Whether our field held a canonical total when read (`cur and cur_ok` below: while `cur`
  -- is still that value or false).
  local cur_ok = cur and canonical(cur)
  local g0 = got[6]
  if g0 and not canonical(g0) then g0 = nil end
  local spent0 = '0'
  if cur_ok then spent0 = cur end
  local bad = {}
  local repaired = 0
  -- Repair a total that cannot be right: missing beside fields, malformed, below the
  -- contributions we can see, or (verify) whatever it is.
  local seen = '0'
  if cur_ok then seen = cur end
  if mine and canonical(mine) then seen = add(seen, mine) end
  -- A malformed field of ours: what the total counted for it is unknown.
  local damaged = (cur and not cur_ok) or (mine and not canonical(mine))
  if verify == '1' or damaged or had_bad or (total and ((not decimal(total)) or greater(seen, total))) then
    total = recompute(key, bad, had_bad)
    repaired = 1
  elseif not total then
    if redis.call('EXISTS', key) == 1 then
      total = recompute(key, bad, had_bad)
      repaired = 1
    else
      total = '0'
    end
  end

  local plus, minus = '0', '0'
  -- The field writes of this call, sent as one `HSET` (with `~total`) at the end: each
  -- `redis.call` costs Redis about a microsecond (issue 11).
  local w = {}
  -- A strict call writes even without spend: the grant field goes with the node field, so
  -- a data dir that takes the node id over must own both before it is granted anything.
  local strict = limit ~= '' and writable
  -- The field this call raises (our node field, or our kept-apart one without the lease) did
  -- not exist: the key may be new.
  local created = false
  local taken_over = nil
  if writable and (own ~= '0' or strict) then
    if cur and owner and owner ~= inst then
      if cur_ok then
        taken_over = cur
        local rf = '~retired:' .. node .. ':' .. owner
        local prev = redis.call('HGET', key, rf)
        if (not prev) or (not canonical(prev)) or greater(cur, prev) then
          w[#w + 1] = rf; w[#w + 1] = cur
          plus = add(plus, cur)
          if prev and canonical(prev) then minus = add(minus, prev) end
        end
        -- The field leaves `cur` (it is rewritten below).
        minus = add(minus, cur)
      end
      cur = false
    end
    created = not got[1]
    local best = own
    if cur and cur_ok and greater(cur, best) then best = cur end
    if mine then
      if canonical(mine) then
        if greater(mine, best) then best = mine end
        minus = add(minus, mine)
      end
      redis.call('HDEL', key, retired_mine)
      mine = false
    end
    if best ~= cur then
      w[#w + 1] = node; w[#w + 1] = best
      plus = add(plus, best)
      if cur and cur_ok then minus = add(minus, cur) end
    end
    if owner ~= inst then w[#w + 1] = owner_field; w[#w + 1] = inst end
    cur, owner = best, inst
  elseif own ~= '0' and cur and owner == inst and cur_ok then
    -- The lease is not ours but the field still is (its holder has not written since): it
    -- is our instance's one counter, so raise it rather than start a second one beside it.
    if greater(own, cur) then
      w[#w + 1] = node; w[#w + 1] = own
      plus, minus = own, cur
      cur = own
    end
  elseif own ~= '0' then
    created = not got[3]
    -- Not ours to write: keep our total apart, under our instance (nobody else writes it).
    if (not mine) or (not canonical(mine)) or greater(own, mine) then
      w[#w + 1] = retired_mine; w[#w + 1] = own
      plus = add(plus, own)
      if mine and canonical(mine) then minus = add(minus, mine) end
      mine = own
    end
  end
  if plus ~= minus then
    local v = moved(total, plus, minus)
    if not v then
      -- The fields first: the recomputation reads them.
      if #w > 0 then redis.call('HSET', key, unpack(w)) end
      w = {}
      total = recompute(key, bad, had_bad)
      repaired = 1
    else
      total = v
      w[#w + 1] = TOTAL; w[#w + 1] = total
    end
  end
  if #w > 0 then redis.call('HSET', key, unpack(w)) end
  -- The key's expiry, only when it may lack one: every call that creates a key or one of our
  -- fields in it sets it (in the same atomic call), so a key that holds our field has it.
  -- A flushed, expired or failed-over-without-it key comes back through a write that finds
  -- our field missing; a repair or a verifying round (the first of every process) sets it
  -- again. See the module doc of `wire.rs`.
  if own ~= '0' and (created or repaired == 1 or verify == '1') and not strict then
    redis.call('EXPIREAT', key, expire_at)
  end

  -- Grants. Our spend moved from spent0 to spent1: our unused grant shrank by as much.
  local spent1 = '0'
  if cur and canonical(cur) then spent1 = cur end
  local grants_damaged = false
  -- Another data dir's grant under this node id was partly spent by it (now retired): only
  -- the unused part goes on with the field.
  local g_eff = g0
  if g0 and taken_over then
    g_eff = over(g0, taken_over)
    redis.call('HSET', key, grant_field, g_eff)
    local gr = redis.call('HGET', key, '~granted')
    if not shift(key, '~granted', gr, g_eff, g0) then grants_damaged = true end
  end
  if g0 and (spent1 ~= spent0 or g_eff ~= g0) then
    local u = redis.call('HGET', key, '~unspent')
    if not shift(key, '~unspent', u, over(g_eff, spent1), over(g0, spent0)) then grants_damaged = true end
  end
  g0 = g_eff
  -- Not strict, or the node id's lease is another data dir's: no grant moves.
  if not strict then
    if grants_damaged then recompute_grants(key) end
    -- The common reply is the four fields alone: every element costs Redis to convert.
    if repaired == 0 then return {cur or '', owner or '', mine or '', total} end
    return {cur or '', owner or '', mine or '', total, repaired, bad, '', '', '', ''}
  end
  local frz = raise_frozen()
  local since = 0
  if grant_lease_ms > 0 then since = heard(key, now_ms, grant_lease_ms) end
  local run = redis.call('HMGET', key, '~granted', '~unspent', '~holders')
  local granted, unspent, holders = run[1], run[2], run[3]
  if grants_damaged or not (granted and decimal(granted)) or not (unspent and decimal(unspent))
      or not (holders and decimal(holders)) then
    granted, unspent, holders = recompute_grants(key)
  end
  local g = g0 or '0'
  -- Rebuild: our durable grant is never forgotten (max). Redis holding less than a node's
  -- durable grant means it lost data (or reclaimed it): freeze raises again while the other
  -- holders re-register.
  local target = g
  if greater(dgrant, g) then
    target = dgrant
    redis.call('SET', KEYS[2], tostring(now_ms))
    frozen, frz = true, true
  end
  -- Our own field was lost (we know we held one): register it even at 0, others await it.
  local mine_gone = (not g0) and listed(known, node)
  local held_back, released = awaiting(key, known, holders, mine_gone)
  if released then granted, unspent, holders = recompute_grants(key) end
  if held_back then frz = true end
  if greater(want, target) then
    if not frz then
      local free = free_after(limit, total, unspent, g, target, spent1)
      if free == '0' and grant_lease_ms > 0 then
        local back = reclaim(key, now_ms, grant_lease_ms, since)
        if back ~= '0' then
          granted, unspent, holders = recompute_grants(key)
          free = free_after(limit, total, unspent, g, target, spent1)
        end
      end
      local room = step(free, limit, holders)
      if greater(room, free) then room = free end
      local ask = sub(want, target)
      if greater(ask, room) then ask = room end
      target = add(target, ask)
    end
  elseif greater(target, want) then
    -- Give-back, never below our spend.
    local floor = want
    if greater(spent1, floor) then floor = spent1 end
    if greater(target, floor) then target = floor end
  end
  if grant_lease_ms > 0 then redis.call('HSET', key, '~seen:' .. node, tostring(now_ms)) end
  if target ~= g or mine_gone then
    redis.call('HSET', key, grant_field, target)
    if not g0 then holders = add(holders, '1'); redis.call('HSET', key, '~holders', holders) end
    local ng = shift(key, '~granted', granted, target, g)
    local nu = shift(key, '~unspent', unspent, over(target, spent1), over(g, spent1))
    if ng and nu then
      granted = ng
    else
      granted, unspent, holders = recompute_grants(key)
    end
  end
  redis.call('EXPIREAT', key, expire_at)
  local f = '0'
  if frz then f = '1' end
  local ids = ''
  local n = 0
  for _ in string.gmatch(known, '[^,]+') do n = n + 1 end
  if n ~= tonumber(holders) then ids = holder_ids(key) end
  return {cur or '', owner or '', mine or '', total, repaired, bad, target, granted, holders, f, ids}
end

local out = {}
for i = 3, #KEYS do
  local b = 8 + (i - 3) * 6
  local ok, r = pcall(merge, KEYS[i], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], ARGV[b + 5],
    ARGV[b + 6])
  -- The state itself (4, 10, or 11 for a strict key) or {'err', error}: no wrapper table per
  -- key.
  if ok then out[i - 2] = r else out[i - 2] = {'err', message(r)} end
end
if writable then
  if release == '1' then
    redis.call('DEL', KEYS[1])
  elseif renew ~= '0' or not holder then
    redis.call('SET', KEYS[1], inst, 'PX', lease_ms)
  end
end
return {lease, out}
