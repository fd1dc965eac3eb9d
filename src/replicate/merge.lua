local U64_MAX = '18446744073709551615'
local TOTAL = '~total'

-- a > b for canonical decimal strings (no sign, no leading zeros).
local function greater(a, b)
  if #a ~= #b then return #a > #b end
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
  return not greater(s, U64_MAX)
end

-- a + b, exact, on canonical decimal strings.
local function add(a, b)
  if a == '0' then return b end
  if b == '0' then return a end
  local out, carry, i, j = {}, 0, #a, #b
  while i > 0 or j > 0 or carry > 0 do
    local x = carry
    if i > 0 then x = x + string.byte(a, i) - 48; i = i - 1 end
    if j > 0 then x = x + string.byte(b, j) - 48; j = j - 1 end
    if x >= 10 then carry = 1; x = x - 10 else carry = 0 end
    out[#out + 1] = string.char(48 + x)
  end
  return string.reverse(table.concat(out))
end

-- a - b for a >= b, exact, on canonical decimal strings.
local function sub(a, b)
  if b == '0' then return a end
  local out, borrow, i, j = {}, 0, #a, #b
  while i > 0 do
    local x = string.byte(a, i) - 48 - borrow
    if j > 0 then x = x - (string.byte(b, j) - 48); j = j - 1 end
    if x < 0 then x = x + 10; borrow = 1 else borrow = 0 end
    out[#out + 1] = string.char(48 + x)
    i = i - 1
  end
  local s = string.gsub(string.reverse(table.concat(out)), '^0+', '')
  if s == '' then return '0' end
  return s
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

local node, inst, lease_ms, release, verify = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local owner_field = '~owner:' .. node
local retired_mine = '~retired:' .. node .. ':' .. inst

local lease
local read, holder = pcall(redis.call, 'GET', KEYS[1])
if not read then
  lease = {'broken', message(holder)}
elseif holder and holder ~= inst then
  lease = {'refused', holder}
else
  lease = {'held'}
end
local writable = lease[1] == 'held'

local function merge(key, own, expire_at)
  local got = redis.call('HMGET', key, node, owner_field, retired_mine, TOTAL, '~bad')
  local cur, owner, mine, total, had_bad = got[1], got[2], got[3], got[4], got[5]
  local bad = {}
  local repaired = 0
  -- Repair a total that cannot be right: missing beside fields, malformed, below the
  -- contributions we can see, or (verify) whatever it is.
  local seen = '0'
  if cur and canonical(cur) then seen = add(seen, cur) end
  if mine and canonical(mine) then seen = add(seen, mine) end
  -- A malformed field of ours: what the total counted for it is unknown.
  local damaged = (cur and not canonical(cur)) or (mine and not canonical(mine))
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
  if writable and own ~= '0' then
    if cur and owner and owner ~= inst then
      if canonical(cur) then
        local rf = '~retired:' .. node .. ':' .. owner
        local prev = redis.call('HGET', key, rf)
        if (not prev) or (not canonical(prev)) or greater(cur, prev) then
          redis.call('HSET', key, rf, cur)
          plus = add(plus, cur)
          if prev and canonical(prev) then minus = add(minus, prev) end
        end
        -- The field leaves `cur` (it is rewritten below).
        minus = add(minus, cur)
      end
      cur = false
    end
    local best = own
    if cur and canonical(cur) and greater(cur, best) then best = cur end
    if mine then
      if canonical(mine) then
        if greater(mine, best) then best = mine end
        minus = add(minus, mine)
      end
      redis.call('HDEL', key, retired_mine)
      mine = false
    end
    if best ~= cur then
      redis.call('HSET', key, node, best)
      plus = add(plus, best)
      if cur and canonical(cur) then minus = add(minus, cur) end
    end
    if owner ~= inst then redis.call('HSET', key, owner_field, inst) end
    cur, owner = best, inst
  elseif own ~= '0' and cur and owner == inst and canonical(cur) then
    -- The lease is not ours but the field still is (its holder has not written since): it
    -- is our instance's one counter, so raise it rather than start a second one beside it.
    if greater(own, cur) then
      redis.call('HSET', key, node, own)
      plus, minus = own, cur
      cur = own
    end
  elseif own ~= '0' then
    -- Not ours to write: keep our total apart, under our instance (nobody else writes it).
    if (not mine) or (not canonical(mine)) or greater(own, mine) then
      redis.call('HSET', key, retired_mine, own)
      plus = add(plus, own)
      if mine and canonical(mine) then minus = add(minus, mine) end
      mine = own
    end
  end
  if plus ~= minus then
    local raised = add(total, plus)
    if greater(minus, raised) then
      total = recompute(key, bad, had_bad)
      repaired = 1
    else
      total = sub(raised, minus)
      redis.call('HSET', key, TOTAL, total)
    end
  end
  if own ~= '0' then redis.call('EXPIREAT', key, expire_at) end
  return {cur or '', owner or '', mine or '', total, repaired, bad}
end

local out = {}
for i = 2, #KEYS do
  local ok, r = pcall(merge, KEYS[i], ARGV[2 * i + 2], ARGV[2 * i + 3])
  if ok then out[i - 1] = {'ok', r} else out[i - 1] = {'err', message(r)} end
end
if writable then
  if release == '1' then
    redis.call('DEL', KEYS[1])
  else
    redis.call('SET', KEYS[1], inst, 'PX', lease_ms)
  end
end
return {lease, out}
