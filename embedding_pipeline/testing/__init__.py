"""Stand-ins for the services that cannot run here, for the tests and the benchmarks.

`fault_server.FaultServer` speaks OpenAI's and Ollama's embedding protocols on a loopback
port and injects provider faults on demand (`python -m embedding_pipeline.testing.fault_server`
runs it by hand); `vectors.fake_vector` is the vector it, and the benchmarks' fake OpenAI
server, answers for a text, and `vectors.b64` OpenAI's base64 encoding of it.

Standard library and numpy only: nothing of Dagster, the settings or the rest of the
package, and nothing of the product imports it (`embedding_pipeline_tests/unit/test_imports.py`).
"""
