"""Agents for tests/integration/test_agents.py, loaded by path as ``env.agent`` is.
Each is written against the openai client only, as a user's agent would be."""

import asyncio

_seen: set[str] = set()  # uids a flaky agent has failed on (one process: LocalAgentPool)


async def two_turns(client, row):
    """Ask, then send the reply back with a user follow-up and ask again; reward 0.25."""
    messages = list(row["messages"])
    first = await client.chat.completions.create(model="m", messages=messages, max_tokens=8)
    messages += [first.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "sure?"}]
    await client.chat.completions.create(model="m", messages=messages, max_tokens=8)
    return 0.25


async def rewrites(client, row):
    """Ask, then send a rewritten history (a new branch); reward.fn scores the final reply."""
    await client.chat.completions.create(model="m", messages=row["messages"])
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "another question"}])
    return None


async def components(client, row):
    await client.chat.completions.create(model="m", messages=row["messages"], temperature=0.3)
    return {"accuracy": 1.0, "format": 0.5}


async def flaky(client, row):
    """Fails the first attempt at each task, after one model call."""
    await client.chat.completions.create(model="m", messages=row["messages"])
    if row["uid"] not in _seen:
        _seen.add(row["uid"])
        raise RuntimeError("tool server hiccup")
    return 1.0


async def hangs(client, row):
    await asyncio.sleep(60)


async def never_asks(client, row):
    return 1.0


async def says_yes(client, row):
    await client.chat.completions.create(model="m", messages=row["messages"])
    return "yes"


def not_async(client, row):
    return 1.0


async def crashes_on_crash(client, row):
    """Kills its whole process (the agent actor) on the task with uid "crash"."""
    import os

    if row["uid"] == "crash":
        os._exit(1)
    await client.chat.completions.create(model="m", messages=row["messages"], max_tokens=4)
    return 1.0
