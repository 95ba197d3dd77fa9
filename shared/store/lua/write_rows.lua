-- Writes each line's row once and counts it. A row is stored only when its line's bit goes
-- 0 -> 1, so a line compacted out of the rows hash can never be written again. The batch's
-- counters are summed over the rows and added once per call.
-- batch record: KEYS[1]
-- KEYS: the batch record, rows hash, in-flight hash, done bitmap, compaction ask.
-- ARGV: compaction thresholds (rows, bytes) and the ask's expiry (ms), then 8 values per row
-- (line, row, ok flag, input, cached, output, reasoning and total tokens).
-- Returns one verdict per row ('new', 'last', 'dup', 'late', 'drained'), and one extra trailing
-- 'compact' when the pending rows passed a threshold and nobody asked in the last ask expiry.

local out = {}
local n = (#ARGV - 3) / 8
local lines = {}
for r = 0, n - 1 do lines[#lines + 1] = ARGV[3 + r * 8 + 1] end
-- (in chunks: Lua's unpack is bounded)
for i = 1, #lines, 1000 do
  redis.call('HDEL', KEYS[3], unpack(lines, i, math.min(i + 999, #lines)))
end
local st = redis.call('HMGET', KEYS[1], 'status', 'stopping', 'total', 'completed', 'failed')
if not st[1] or (st[1] ~= 'in_progress' and st[1] ~= 'cancelling') then
  for r = 1, n do out[r] = 'late' end
  return out
end
-- counters are summed over the rows and added once
local fields = {'u_in', 'u_cached', 'u_out', 'u_reasoning', 'u_total'}
local sums = {0, 0, 0, 0, 0}
local pend_b, completed, failed = 0, 0, 0
local done = tonumber(st[4] or '0') + tonumber(st[5] or '0')
local total = tonumber(st[3] or '')
local last = 0
for r = 0, n - 1 do
  local a = 3 + r * 8
  local line = ARGV[a + 1]
  -- The rows hash is checked too: rows written before the bitmap existed have no bit.
  local inserted = redis.call('HEXISTS', KEYS[2], line) == 0
    and redis.call('SETBIT', KEYS[4], line, 1) == 0
  if inserted then
    redis.call('HSET', KEYS[2], line, ARGV[a + 2])
    pend_b = pend_b + #ARGV[a + 2]
    if ARGV[a + 3] == '1' then completed = completed + 1 else failed = failed + 1 end
    done = done + 1
    for i = 1, 5 do
      local v = tonumber(ARGV[a + 3 + i])
      if v and v > 0 then sums[i] = sums[i] + v end
    end
    if not st[2] and total and done >= total and last == 0 then
      out[r + 1] = 'last'
      last = 1
    else
      out[r + 1] = 'new'
    end
  else
    out[r + 1] = 'dup'
  end
end
local added = completed + failed
if added > 0 then
  redis.call('HINCRBY', KEYS[1], 'pend_n', added)
  redis.call('HINCRBY', KEYS[1], 'pend_b', pend_b)
  if completed > 0 then redis.call('HINCRBY', KEYS[1], 'completed', completed) end
  if failed > 0 then redis.call('HINCRBY', KEYS[1], 'failed', failed) end
  for i = 1, 5 do
    if sums[i] > 0 then redis.call('HINCRBY', KEYS[1], fields[i], sums[i]) end
  end
end
-- a stopping batch whose last line in flight just ended: its last row tells the aggregator
if st[2] and n > 0 and redis.call('HLEN', KEYS[3]) == 0 then out[n] = 'drained' end
if added > 0 then
  local p = redis.call('HMGET', KEYS[1], 'pend_n', 'pend_b')
  if (tonumber(p[1] or '0') >= tonumber(ARGV[1]) or tonumber(p[2] or '0') >= tonumber(ARGV[2]))
    and redis.call('SET', KEYS[5], '1', 'NX', 'PX', ARGV[3]) then
    out[#out + 1] = 'compact'
  end
end
return out
