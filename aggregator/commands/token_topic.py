"""`meterline token create --kafka`: a token published on the cluster's control topic, which
edges and cores read (`intake.token_records`); the data dir only gives the cluster secret, if
--secret-file does not."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import uuid
from datetime import UTC, datetime

from aggregator.auth import (
    TOKEN_PREFIX,
    Organization,
    TokenRow,
    cluster_secret,
    token_hash,
)
from aggregator.commands.common import kafka_of
from aggregator.intake.sealed import Sealer
from aggregator.intake.token_records import (
    TokenView,
    organization_record,
    publish,
    token_record,
)
from ingest.settings import KafkaSettings


def create(args: argparse.Namespace) -> str:
    """A new token of organization `--org` (made if the topic has none of that name),
    published on the control topic (`intake.token_records`); its text."""
    return asyncio.run(_create(args))


async def _create(args: argparse.Namespace) -> str:
    secret = cluster_secret(args.data_dir, args.secret_file, create=False)
    return await published(kafka_of(args), secret, args.org, args.label)


async def published(kafka: KafkaSettings, secret: bytes, org_name: str, label: str) -> str:
    """A new token of organization `org_name` (made if the topic has none of that name),
    published on the control topic with the cluster `secret`; its text. A secret that opens
    none of the topic's sealed records is refused (UsageError): the token would work nowhere."""
    sealer = Sealer(secret)
    async with TokenView(kafka, sealer, secret, only_tokens=True) as view:
        org = view.organization_named(org_name)
    now = datetime.now(UTC).isoformat()
    records = []
    if org is None:
        org = Organization(str(uuid.uuid4()), org_name)
        records.append(organization_record(org, now))
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = TokenRow(str(uuid.uuid4()), org.id, token_hash(secret, token), label, now, None)
    records.append(token_record(row))
    await publish(kafka, sealer, records)
    return token
