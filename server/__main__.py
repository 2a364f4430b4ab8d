"""`python -m server`: the same as `inflight-serve`."""

from server.cli import main

main()
