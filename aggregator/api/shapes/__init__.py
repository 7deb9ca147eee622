"""The API's response shapes (and the request models it takes), one module per resource.

Responses are TypedDicts, so that a schema can be generated from them
(`pydantic.TypeAdapter(...).json_schema()`); each comes with the function that builds it from
a service's rows. The key order of each built dict is the JSON's, which clients depend on.
They are `typing_extensions` TypedDicts: pydantic reads only those on Python < 3.12.
"""

from aggregator.api.shapes.common import iso

__all__ = ["iso"]
