"""Usage events to meterline's topic with librdkafka (confluent-kafka): JSON records."""

import json
import os

from confluent_kafka import KafkaError, Message, Producer

ORG_ID = os.environ["METERLINE_ORG_ID"]  # the organization's id in meterline
TOPIC = os.environ.get("METERLINE_TOPIC", "meterline.events")

producer = Producer(
    {
        "bootstrap.servers": os.environ.get("METERLINE_KAFKA", "127.0.0.1:9092"),
        "acks": "all",
        # CRC-32 of the key modulo the partitions, as the edges choose: a customer's events
        # stay in order. (librdkafka's default, consistent_random, differs for empty keys only.)
        "partitioner": "consistent",
    }
)
failed: list[KafkaError] = []


def delivered(error: KafkaError | None, message: Message) -> None:
    if error is not None:
        failed.append(error)


for i in range(1, 4):
    customer = f"cust_{i % 2}"
    event = {
        "organization_id": ORG_ID,
        "name": "api_call",
        "external_customer_id": customer,
        "external_id": f"librdkafka-{i}",  # a record sent twice is applied once
        "metadata": {"tokens": 10 * i},
    }
    producer.produce(
        TOPIC, json.dumps(event).encode(), key=f"{ORG_ID}/ext:{customer}", on_delivery=delivered
    )
if producer.flush(30) or failed:
    raise SystemExit(f"not delivered: {failed or 'timed out'}")
