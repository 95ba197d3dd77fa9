-- Registers segment ARGV[1] (record ARGV[2], ARGV[3] row bytes) holding lines ARGV[4..]
-- and deletes exactly those rows, all or nothing: refused unless every one of them is still
-- pending, so two compactions of the same rows (a replica whose lease lapsed) can never both
-- count, and a row is deleted only once a registered segment holds it.
-- batch record: KEYS[3]
-- KEYS: the batch's rows hash, its segments hash, the batch record, the done bitmap.
-- Returns 1 when registered, 0 when refused.

for i = 4, #ARGV do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then return 0 end
end
for i = 4, #ARGV do
  redis.call('HDEL', KEYS[1], ARGV[i])
  -- Already set for rows written with the bitmap; this covers rows written before it existed.
  redis.call('SETBIT', KEYS[4], ARGV[i], 1)
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[3], 'pend_n', -(#ARGV - 3))
redis.call('HINCRBY', KEYS[3], 'pend_b', -tonumber(ARGV[3]))
return 1
