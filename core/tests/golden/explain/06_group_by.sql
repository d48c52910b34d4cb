SELECT avg(pet_age) ,  max(pet_age) ,  pettype FROM pets GROUP BY pettype
