"""The Deployments page: a FastAPI app (:mod:`include.deployments.page.app`) and its static HTML."""
