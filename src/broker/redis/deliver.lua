#!lua
-- Records first deliveries: an entry still in the stream, of the same epoch, counts once across
-- replicas. Returns how many were new. The stream holds every seq after `trimmed` up to
-- `last_seq` (trim.lua keeps `trimmed`; both come back together from a snapshot or a failover).
-- KEYS: log, meta, delivered   ARGV: epoch, seqs...
local state = redis.call('HMGET', KEYS[2], 'epoch', 'last_seq', 'trimmed')
if state[1] ~= ARGV[1] then
  return 0
end
local last = tonumber(state[2] or '0')
local trimmed = state[3]
if not trimmed then
  -- A channel last trimmed before `trimmed` was kept: what precedes its first entry is gone.
  local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
  trimmed = first and (tonumber(string.match(first[1], '^(%d+)')) - 1) or last
  redis.call('HSET', KEYS[2], 'trimmed', trimmed)
end
trimmed = tonumber(trimmed)
local count = 0
for i = 2, #ARGV do
  local seq = tonumber(ARGV[i])
  if seq and seq > trimmed and seq <= last and redis.call('SADD', KEYS[3], ARGV[i]) == 1 then
    count = count + 1
  end
end
if count > 0 then
  redis.call('HINCRBY', KEYS[2], 'delivered', count)
  redis.call('HINCRBY', KEYS[2], 'pending', -count)
end
return count
