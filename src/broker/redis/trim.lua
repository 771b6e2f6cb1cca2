-- Drops the oldest entries of a channel stream while there are more than max_events or the oldest
-- is older than min_t (ms). An entry nobody delivered is lost: expired_subscribed when its
-- PUBLISH reached a replica (someone watched), else expired_unseen. The last seq dropped is kept
-- in `trimmed`: the stream holds every seq after it up to `last_seq` (deliver.lua relies on it).
local function trim(log, meta, delivered, offered, max_events, min_t)
  local unseen, subscribed = 0, 0
  local dropped = nil
  local len = redis.call('XLEN', log)
  while len > 0 do
    local first = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)[1]
    if len <= max_events and tonumber(first[2][4]) >= min_t then
      break
    end
    local seq = string.match(first[1], '^(%d+)')
    redis.call('XDEL', log, first[1])
    dropped = seq
    len = len - 1
    local was_offered = redis.call('SREM', offered, seq) == 1
    if redis.call('SREM', delivered, seq) == 0 then
      redis.call('HINCRBY', meta, 'pending', -1)
      if was_offered then
        subscribed = subscribed + 1
        redis.call('HINCRBY', meta, 'lost_expired_subscribed', 1)
      else
        unseen = unseen + 1
        redis.call('HINCRBY', meta, 'lost_expired_unseen', 1)
      end
    end
  end
  if dropped then
    redis.call('HSET', meta, 'trimmed', dropped)
  end
  return unseen, subscribed
end
