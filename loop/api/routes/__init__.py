"""All routers, in the order they are mounted. One module per resource."""

from loop.api.routes import (
           conversations,
           export,
           feedback,
           health,
           history,
           proxy,
           quarantine,
           queue,
           raters,
           runs,
           stats,
           train,
           versions,
)

ROUTERS = [health.router, proxy.router, feedback.router, history.router, export.router, stats.router, train.router,
           versions.router, runs.router, quarantine.router, raters.router,
           queue.router, conversations.router]
