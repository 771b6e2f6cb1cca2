#!lua
-- Records first deliveries, for one or more channels of one slot: an entry still in the stream, of
-- the same epoch, counts once across replicas. Returns how many were new. A stream holds every seq
-- after `trimmed` up to `last_seq` (trim.lua keeps `trimmed`; both come back together from a
-- snapshot or a failover).
-- KEYS: log, meta, delivered of each channel in turn
-- ARGV: for each channel in turn: epoch, how many seqs, the seqs
local count = 0
local at = 1
for k = 1, #KEYS, 3 do
  local log, meta, delivered = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  local epoch, seqs = ARGV[at], tonumber(ARGV[at + 1])
  local first = at + 2
  at = first + seqs
  local state = redis.call('HMGET', meta, 'epoch', 'last_seq', 'trimmed')
  if state[1] == epoch then
    local last = tonumber(state[2] or '0')
    local trimmed = state[3]
    if not trimmed then
      -- A channel last trimmed before `trimmed` was kept: what precedes its first entry is gone.
      local oldest = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)[1]
      trimmed = oldest and (tonumber(string.match(oldest[1], '^(%d+)')) - 1) or last
      redis.call('HSET', meta, 'trimmed', trimmed)
    end
    trimmed = tonumber(trimmed)
    local new = 0
    for i = first, at - 1 do
      local seq = tonumber(ARGV[i])
      if seq and seq > trimmed and seq <= last and redis.call('SADD', delivered, ARGV[i]) == 1 then
        new = new + 1
      end
    end
    if new > 0 then
      redis.call('HINCRBY', meta, 'delivered', new)
      redis.call('HINCRBY', meta, 'pending', -new)
      count = count + new
    end
  end
end
return count
