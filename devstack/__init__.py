"""Dev tooling, not the product: start and stop local servers (Redis, Triton, a
Kafka-protocol broker, the API, nginx) for tests, benchmarks and offline replays, and the
`railtower demo` walk-through. The product packages never import it (pyproject.toml's
import-linter contracts); tests, benchmarks, the CLI and offline training tools may."""
