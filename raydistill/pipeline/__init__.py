"""The Ray side of raydistill: teacher actor pool, embedding cache, Train worker loop, evaluation."""
