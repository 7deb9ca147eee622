"""Usage events to meterline's topic from Python with aiokafka: JSON records, one event each."""

import asyncio
import json
import os
import zlib

from aiokafka import AIOKafkaProducer

BOOTSTRAP = os.environ.get("METERLINE_KAFKA", "127.0.0.1:9092")
ORG_ID = os.environ["METERLINE_ORG_ID"]  # the organization's id in meterline
TOPIC = os.environ.get("METERLINE_TOPIC", "meterline.events")


async def main() -> None:
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all")
    await producer.start()
    try:
        partitions = len(await producer.partitions_for(TOPIC))
        for i in range(1, 4):
            customer = f"cust_{i % 2}"
            event = {
                "organization_id": ORG_ID,
                "name": "api_call",
                "external_customer_id": customer,
                "external_id": f"aiokafka-{i}",  # a record sent twice is applied once
                "metadata": {"tokens": 10 * i},
            }
            # Keyed and partitioned as the edges do: a customer's events stay in order.
            key = f"{ORG_ID}/ext:{customer}".encode()
            await producer.send_and_wait(
                TOPIC, json.dumps(event).encode(), key=key, partition=zlib.crc32(key) % partitions
            )
    finally:
        await producer.stop()


asyncio.run(main())
