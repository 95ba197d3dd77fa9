-- Pending rows from HSCAN cursor ARGV[1] until they pass ARGV[2] bytes or ARGV[3] rows
-- (or the scan ends). A scan spread over several calls may return a row twice (the hash may
-- rehash between calls): callers dedupe by line.
-- KEYS[1]: the batch's rows hash.
-- Returns {next cursor, line, row, line, row, ...}.

local cursor, budget, most = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out, used, n = {''}, 0, 0
repeat
  local r = redis.call('HSCAN', KEYS[1], cursor, 'COUNT', 16)
  cursor = r[1]
  local kv = r[2]
  for i = 1, #kv, 2 do
    out[#out + 1] = kv[i]
    out[#out + 1] = kv[i + 1]
    used = used + #kv[i + 1]
    n = n + 1
  end
until cursor == '0' or used >= budget or n >= most
out[1] = cursor
return out
