-- Replaces segments ARGV[3..] by segment ARGV[1] (record ARGV[2]) that merges them.
-- KEYS[1]: the batch's segments hash.
-- Returns 1 when replaced, 0 (refused) unless all of them are still registered.

for i = 3, #ARGV do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then return 0 end
end
for i = 3, #ARGV do
  redis.call('HDEL', KEYS[1], ARGV[i])
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
