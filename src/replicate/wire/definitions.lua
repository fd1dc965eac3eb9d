-- Runtime budget definitions: one hash, KEYS[1] = {prefix}:budgets, field = scope:name:period
-- part, value = a record's JSON ({"version", "node", "deleted", "at", "budget"}), plus the
-- counter field `~changes`, raised by every change of the hash.
--
-- ARGV[1] = 'put':    ARGV[2] field, ARGV[3] version, ARGV[4] node, ARGV[5] the record's JSON.
--   Writes the field only when (version, node) beats the field's (a greater version, or an
--   equal one from a greater node id, compared byte by byte: Lua's `<` on strings follows the
--   server's locale), or when the field is absent or unreadable.
--   Returns {1, changes after the write} or {0, the field's value} (the winner).
-- ARGV[1] = 'forget': ARGV[2] field, ARGV[3] the value expected.
--   Removes the field only while it still holds exactly that value (an old tombstone).
--   Returns 1 when removed, else 0.

local function after(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      return x > y
    end
  end
  return #a > #b
end

local hash, op, field = KEYS[1], ARGV[1], ARGV[2]
local current = redis.call('HGET', hash, field)

if op == 'forget' then
  if current == ARGV[3] then
    redis.call('HDEL', hash, field)
    redis.call('HINCRBY', hash, '~changes', 1)
    return 1
  end
  return 0
end

if current then
  local ok, held = pcall(cjson.decode, current)
  if ok and type(held) == 'table' and type(held.version) == 'number'
      and type(held.node) == 'string' then
    local version = tonumber(ARGV[3])
    if held.version > version
        or (held.version == version and not after(ARGV[4], held.node)) then
      return {0, current}
    end
  end
end
redis.call('HSET', hash, field, ARGV[5])
return {1, redis.call('HINCRBY', hash, '~changes', 1)}
