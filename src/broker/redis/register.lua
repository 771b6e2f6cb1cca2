#!lua
-- Registers a run in the shared registry, atomically: a hash of targets and a sorted set of when
-- each registration expires, both in one slot ({runs}), so the registry is bounded in time
-- (resolve.registry_ttl) and in size (resolve.registry_capacity) without a key per run.
-- A run registered to another channel is left as it is (its value is returned); the same
-- registration again lives on from now; a new one is refused while the registry holds capacity
-- live registrations (none is pushed out, or a flood could free a run for someone else to claim).
-- Returns {status, value}: 1 registered, 0 registered elsewhere (value: that registration), 2 full.
-- KEYS: targets, expiry   ARGV: run_id, value (JSON with its channel), channel, now_ms, ttl_ms,
--       capacity
local targets, expiry = KEYS[1], KEYS[2]
local run, value, channel = ARGV[1], ARGV[2], ARGV[3]
local now, ttl, capacity = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
-- Expired registrations leave a few at a time: every registration removes more than it adds.
local expired = redis.call('ZRANGEBYSCORE', expiry, '-inf', now, 'LIMIT', 0, 64)
for _, old in ipairs(expired) do
  redis.call('HDEL', targets, old)
  redis.call('ZREM', expiry, old)
end
local until_ms = tonumber(redis.call('ZSCORE', expiry, run))
local existing = until_ms and until_ms > now and redis.call('HGET', targets, run)
if existing then
  if cjson.decode(existing).channel ~= channel then
    return {0, existing}
  end
  redis.call('ZADD', expiry, now + ttl, run)
  return {1, ''}
end
if redis.call('ZCOUNT', expiry, '(' .. now, '+inf') >= capacity then
  return {2, ''}
end
redis.call('HSET', targets, run, value)
redis.call('ZADD', expiry, now + ttl, run)
return {1, ''}
