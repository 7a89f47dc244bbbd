"""What the image service, its agents and its callers share on the bus.

Queue names (`names`), the contract's error codes (`errors`), the agent's commands, results and
heartbeats (`agent`), event bodies (`events`), the aio-pika transport (`transport`) and the
loading of process settings (`config`). This package imports nothing else of `image_service`,
so `backup_agent` can import it without the service (import-linter checks both rules).
"""
