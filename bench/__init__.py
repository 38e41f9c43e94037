"""`make bench`: Moxy measured against nginx proxy_cache on loopback, as ratios within one run (see README.md)."""
