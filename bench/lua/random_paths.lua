-- wrk script: every request asks for a path drawn at random from a file (one path a line, given after `--`).
-- Random keys over a set larger than Moxy's memory tier measure the disk tier as a busy site uses it.

local paths = {}
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("thread_number", threads)
end

function init(args)
  for line in io.lines(args[1]) do
    paths[#paths + 1] = line
  end
  if #paths == 0 then
    error("no path in " .. args[1])
  end
  -- Each thread draws its own sequence; the same seed would send both threads after the same keys.
  math.randomseed(os.time() * 100 + thread_number)
end

function request()
  return wrk.format("GET", paths[math.random(#paths)])
end
