-- wrk script: every request asks for the next path of a file (one path a line, given after `--`), each thread
-- taking its own share (thread k of n: lines k, k+n, k+2n, ...), so no path is asked twice while the list lasts.
-- The bench makes the list longer than a run can use up and checks, from the origin's log, that every answer
-- was a trip upstream: a list run out would start over and be served from cache, and that check would refuse it.

local paths = {}
local threads = 0
local next_index = 1

function setup(thread)
  threads = threads + 1
  thread:set("thread_number", threads)
end

function init(args)
  -- args[2]: how many wrk threads share the list (the bench passes its -t).
  local share = tonumber(args[2])
  local number = 0
  for line in io.lines(args[1]) do
    if number % share == thread_number - 1 then
      paths[#paths + 1] = line
    end
    number = number + 1
  end
  if #paths == 0 then
    error("no path for thread " .. thread_number .. " in " .. args[1])
  end
end

function request()
  local path = paths[next_index]
  next_index = next_index % #paths + 1
  return wrk.format("GET", path)
end
