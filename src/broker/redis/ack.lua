#!lua
-- A cumulative ack: moves acked_seq forward and counts the newly acked. Returns that count.
-- KEYS: meta   ARGV: epoch, seq
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then
  return 0
end
local seq = tonumber(ARGV[2])
local acked = tonumber(redis.call('HGET', KEYS[1], 'acked_seq') or '0')
if seq <= acked then
  return 0
end
redis.call('HSET', KEYS[1], 'acked_seq', seq)
redis.call('HINCRBY', KEYS[1], 'acked', seq - acked)
return seq - acked
