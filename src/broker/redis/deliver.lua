#!lua
-- Records first deliveries: an entry still in the stream, of the same epoch, counts once across
-- replicas. Returns how many were new.
-- KEYS: log, meta, delivered   ARGV: epoch, seqs...
if redis.call('HGET', KEYS[2], 'epoch') ~= ARGV[1] then
  return 0
end
local count = 0
for i = 2, #ARGV do
  local id = ARGV[i] .. '-0'
  if #redis.call('XRANGE', KEYS[1], id, id) == 1 and redis.call('SADD', KEYS[3], ARGV[i]) == 1 then
    count = count + 1
  end
end
if count > 0 then
  redis.call('HINCRBY', KEYS[2], 'delivered', count)
  redis.call('HINCRBY', KEYS[2], 'pending', -count)
end
return count
