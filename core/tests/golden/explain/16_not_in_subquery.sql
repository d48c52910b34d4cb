SELECT name FROM stadium WHERE stadium_id NOT IN (SELECT stadium_id FROM concert)
