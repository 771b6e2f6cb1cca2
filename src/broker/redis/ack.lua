#!lua
-- Cumulative acks, for one or more channels of one slot: each moves its channel's acked_seq forward
-- and counts the newly acked. Returns how many were newly acked in all.
-- KEYS: meta of each channel   ARGV: epoch, seq of each channel in turn
local count = 0
for k = 1, #KEYS do
  local meta, epoch, seq = KEYS[k], ARGV[2 * k - 1], tonumber(ARGV[2 * k])
  if redis.call('HGET', meta, 'epoch') == epoch then
    local acked = tonumber(redis.call('HGET', meta, 'acked_seq') or '0')
    if seq > acked then
      redis.call('HSET', meta, 'acked_seq', seq)
      redis.call('HINCRBY', meta, 'acked', seq - acked)
      count = count + seq - acked
    end
  end
end
return count
